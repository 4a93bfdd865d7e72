"""Mixture of experts: sqrt-softplus scoring, score-routed (with selection bias) or hash-routed
(`tid2eid`: a frozen token id -> experts table) layers, a shared expert, clamped SwiGLU.

Names follow the official checkpoint: `gate.weight`, `gate.bias` (selection only, fp32),
`gate.tid2eid`, `experts.E.{w1,w2,w3}`, `shared_experts.{w1,w2,w3}`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .parallel import SINGLE, Shard, all_reduce


class Expert(nn.Module):
    """w2(silu(min(w1 x, limit)) * clamp(w3 x, -limit, limit))."""

    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w1(x).clamp(max=self.limit)
        up = self.w3(x).clamp(min=-self.limit, max=self.limit)
        return self.w2(F.silu(gate) * up)


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, hashed: bool):
        super().__init__()
        self.hashed, self.topk = hashed, cfg.num_experts_per_tok
        self.scoring, self.route_scale = cfg.scoring_func, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.long))
        else:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, ids: torch.Tensor):
        """x [N, D], ids [N] -> (weights [N, k], experts [N, k])."""
        logits = F.linear(x, self.weight)
        if self.scoring == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        elif self.scoring == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        if self.hashed:
            idx = self.tid2eid[ids].long()
        else:  # the bias steers which experts are picked, never how much they weigh
            idx = torch.topk(scores + self.bias, self.topk, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.route_scale, idx


class MoE(nn.Module):
    """Routed experts keyed by their global index (`experts.E`); under expert parallelism this rank holds
    only its own range of them, runs those on the tokens routed there, and the routed sums are added across
    ranks before the (replicated) shared expert."""

    def __init__(self, cfg: ModelConfig, layer: int, shard: Shard = SINGLE):
        super().__init__()
        I, D = cfg.moe_intermediate_size, cfg.hidden_size
        self.shard, self.n_experts = shard, cfg.n_routed_experts
        self.gate = Gate(cfg, cfg.mlp_layer_types[layer] == "hash_moe")
        lo, hi = shard.span(cfg.n_routed_experts)
        self.experts = nn.ModuleDict({str(e): Expert(D, I, cfg.swiglu_limit) for e in range(lo, hi)})
        self.shared_experts = Expert(D, I, cfg.swiglu_limit)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        w, idx = self.gate(x, ids.reshape(-1))
        return (all_reduce(self.routed(x, w, idx), self.shard) + self.shared_experts(x)).view(shape)

    def routed(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sum over the routed experts this rank holds [N, D] of tokens x [N, D] with gate weights w [N, k]
        for experts idx [N, k]; each expert's rows are added in ascending expert order."""
        out = torch.zeros_like(x)
        # Each expert runs once on the tokens routed to it (a python loop over experts with work).
        flat = idx.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        token_of = order // idx.shape[1]
        weight_of = w.flatten()[order]
        start = 0
        for e, c in enumerate(counts):
            expert = self.experts[str(e)] if c and str(e) in self.experts else None  # None: another rank's
            if expert is not None:
                tok = token_of[start : start + c]
                y = expert(x[tok]) * weight_of[start : start + c, None]
                out.index_add_(0, tok, y.to(out.dtype))
            start += c
        return out
