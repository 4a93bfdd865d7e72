"""The DeepSeek-V4 transformer: embeddings -> n mHC residual streams -> blocks -> hyper-head -> logits.

The model is stateless: every call takes the explicit per-sequence `Cache` (runtime/cache.py) and
extends it in place; without one, a fresh cache is used and dropped (a plain full forward).
Module attributes mirror the official checkpoint's tensor names (`embed`, `layers.N.attn.wq_a`,
`layers.N.hc_attn_fn`, `layers.N.ffn.experts.E.w1`, `hc_head_fn`, `head`, ...), so loading is
assignment, not renaming; runtime/checkpoint.py maps the other spellings onto these names.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from .attention import Attention
from .cache import Cache
from .config import ConfigError, ModelConfig
from .layers import RMSNorm, hc_collapse, hc_expand, hc_weights, rope_inv_freq, unweighted_rms_norm
from .moe import MoE
from .parallel import SINGLE, Shard, all_reduce, gather_last
from .timing import region


class Block(nn.Module):
    """Attention sub-block then MoE sub-block, each wrapped in its own mHC mixing."""

    timer = None  # a runtime.timing.LayerTimer while one is attached (Transformer.attach_timer)

    def __init__(self, cfg: ModelConfig, layer: int, shard: Shard = SINGLE):
        super().__init__()
        self.cfg = cfg
        n, D = cfg.hc_mult, cfg.hidden_size
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer, shard)
        self.ffn = MoE(cfg, layer, shard)
        for site in ("attn", "ffn"):  # mHC parameters are kept in fp32
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.zeros((2 + n) * n, n * D, dtype=torch.float32)))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.zeros((2 + n) * n, dtype=torch.float32)))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.zeros(3, dtype=torch.float32)))

    def _hc(self, site: str, streams: torch.Tensor):
        c = self.cfg
        return hc_weights(streams, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                          getattr(self, f"hc_{site}_scale"), c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def forward(self, streams, ids, positions, layer_cache, impl="sparse", capture=None, keep=0, offset=0,
                steering=None):
        with region(self.timer, "mhc"):
            pre, post, comb = self._hc("attn", streams)
            x = hc_collapse(streams, pre)
        x = self.attn_norm(x)  # rebinding x frees the collapsed streams before attention runs
        y = self.attn(x, positions, layer_cache, impl, capture, keep, offset, steering)
        if keep:  # only the last `keep` positions go on (the cache above took all of them)
            streams, post, comb, ids = streams[:, -keep:], post[:, -keep:], comb[:, -keep:], ids[:, -keep:]
        with region(self.timer, "mhc"):
            streams = hc_expand(streams, y, post, comb)
            pre, post, comb = self._hc("ffn", streams)
            x = hc_collapse(streams, pre)
        x = self.ffn_norm(x)
        y = self.ffn(x, ids)
        with region(self.timer, "mhc"):
            return hc_expand(streams, y, post, comb)


class Transformer(nn.Module):
    """`shard` (runtime/parallel.py): this rank's slice under tensor/expert parallelism; called with the same
    inputs on every rank, each call returns the same full logits everywhere."""

    timer = None  # see attach_timer
    # "fast": one-token steps (`decode`) run runtime/compiled.py's compiled step, built at the first one;
    # "eager": the forward, the reference. load_model picks "fast" (see there); a model built here is eager.
    decode_impl = "eager"
    fast_decode = None  # the runtime.compiled.FastDecode in use

    def __init__(self, cfg: ModelConfig, shard: Shard = SINGLE):
        super().__init__()
        self.config, self.shard = cfg, shard
        n, D = cfg.hc_mult, cfg.hidden_size
        V = cfg.vocab_size // shard.world  # embedding rows and head outputs of this rank's vocabulary slice
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList(Block(cfg, i, shard) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.head = nn.Linear(D, V, bias=False)
        self.hc_head_fn = nn.Parameter(torch.zeros(n, n * D, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.attn_impl = "sparse"  # "eager" selects the dense reference path (same semantics)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def attach_timer(self, timer) -> None:
        """Points the timing regions of the model, its blocks and attention modules at `timer` (a
        runtime.timing.LayerTimer attaches itself); None detaches them. Untimed, each region is a no-op."""
        for m in (self, *self.layers, *(b.attn for b in self.layers)):
            if timer is None:
                m.__dict__.pop("timer", None)  # back to the class default, None
            else:
                m.timer = timer

    def new_cache(self, batch_size: int = 1, index_dtype: torch.dtype | None = None) -> Cache:
        return Cache(self.config, batch_size, index_dtype)

    def hidden(self, input_ids: torch.Tensor, cache: Cache, capture=None, keep: int = 0,
               position_offset: int = 0, steering=None) -> torch.Tensor:
        """Final normalised hidden states [B, S, D] (last `keep` positions if keep > 0); extends `cache` by S.

        position_offset > 0 (training only) gives these tokens, and the compressed entries they complete,
        RoPE positions shifted by it: a chunk fed after an earlier one with a larger offset sits that
        many positions further on, as if the skipped tokens were there (position skipping, PoSE). Place
        the skip where the cache length is a multiple of the largest compression rate, so that no pooling
        window straddles it, and pass the same offset for everything after it.

        steering: a runtime.steering.Steering forcing spans out of / into every CSA layer's top-k, or its
        width, for this call (None: the default path, untouched).
        """
        B, S = input_ids.shape
        if B != cache.batch_size:
            raise ValueError(f"input batch {B} does not match the cache's batch size {cache.batch_size}")
        if position_offset < 0:
            raise ValueError(f"position_offset must be >= 0, got {position_offset}")
        if cache.length + S + position_offset > self.config.max_position_embeddings:
            raise ValueError(f"{cache.length + S + position_offset} positions exceed max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        positions = torch.arange(cache.length, cache.length + S, device=input_ids.device)
        streams = self.streams(input_ids)
        keep = keep if 0 < keep < S else 0
        last = len(self.layers) - 1
        for i, (layer, lc) in enumerate(zip(self.layers, cache.layers)):
            streams = layer(streams, input_ids, positions, lc, self.attn_impl, capture, keep if i == last else 0,
                            position_offset, steering)
        cache.length += S
        with region(self.timer, "mhc"):
            x = self.hyper_head(streams)
        return self.norm(x)

    def streams(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The n residual streams [B, S, n, D] of the tokens, each their embedding."""
        return self._embed(input_ids).unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()

    def hyper_head(self, streams: torch.Tensor) -> torch.Tensor:
        """The n streams collapsed with input-dependent weights (no post, no Sinkhorn): [B, S, D]."""
        c = self.config
        flat = unweighted_rms_norm(streams.flatten(2).float(), c.rms_norm_eps)
        pre = torch.sigmoid(nn.functional.linear(flat, self.hc_head_fn.float()) * self.hc_head_scale.float()
                            + self.hc_head_base.float()) + c.hc_eps
        return hc_collapse(streams, pre)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.shard.active:
            return self.embed(ids)
        lo = self.shard.rank * self.embed.num_embeddings
        local = ids - lo
        outside = (local < 0) | (local >= self.embed.num_embeddings)
        x = self.embed(local.masked_fill(outside, 0)).masked_fill(outside[..., None], 0)
        return all_reduce(x, self.shard)  # one rank holds each id's row; the others add zeros

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, capture=None,
                logits_to_keep: int = 0, steering=None) -> torch.Tensor:
        """Logits [B, S, vocab] (float) continuing the sequence in `cache` (a fresh one if None).

        logits_to_keep=k > 0 returns only the last k positions (a long prefill needs only the last).
        steering: see `hidden` and runtime/steering.py (counterfactual selection).
        """
        cache = cache if cache is not None else self.new_cache(input_ids.shape[0])
        logits = self.head(self.hidden(input_ids, cache, capture, logits_to_keep, steering=steering)).float()
        return gather_last(logits, self.shard)  # [B, S, vocab] on every rank

    @property
    def prefill_dtype(self) -> torch.dtype | None:
        return next((b.attn.dense_dtype for b in self.layers if b.attn.compressor is not None), None)

    def set_prefill_dtype(self, dtype: torch.dtype | None) -> None:
        """The dtype prefill's fused dense pass over the HCA entries computes in (Attention.dense_dtype):
        None computes in the entries' own dtype, the reference; bf16 on a CPU with native bf16 (AMX) is
        ~2.5x faster on that pass, half of a 1M-token prefill, at a stated cost (runtime/isa.py)."""
        for block in self.layers:
            block.attn.dense_dtype = dtype

    def decode(self, input_ids: torch.Tensor, cache: Cache, capture=None, steering=None) -> torch.Tensor:
        """Logits [B, 1, vocab] of one new token per sequence (input_ids [B, 1]): the compiled step when
        enabled and it applies (runtime/compiled.py), else the forward -- the reference. `steering`: as in
        `hidden` (a counterfactual's forced CSA selection)."""
        if self.decode_impl == "fast":
            if self.fast_decode is None:
                from .compiled import FastDecode
                self.fast_decode = FastDecode(self)
            logits = self.fast_decode(input_ids, cache, capture, steering)
            if logits is not None:
                return logits
        return self(input_ids, cache, capture=capture, logits_to_keep=1, steering=steering)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "Transformer":
        """Random weights for training from scratch and for benchmarks (no checkpoint needed).

        Linears ~ N(0, 1/fan_in); norms 1; gate biases 0; hash table random. mHC: the dynamic
        projections `hc_*_fn` start small and random with scale 1 -- zero fn *and* zero scale would get
        no gradient and never move -- and the residual-mixing part of `hc_*_base` starts at the identity
        (each stream keeps itself), so every sub-layer first sees about the average of its streams.
        """
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf.startswith("hc_") or leaf in ("attn_sink", "ape"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in self.named_buffers():
            if name.endswith("tid2eid"):
                E = self.config.n_routed_experts
                b.copy_(torch.stack([torch.randperm(E, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]))
            elif name.endswith("gate.bias"):
                b.zero_()
        g, n = torch.Generator().manual_seed(seed + 1), self.config.hc_mult
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("hc_") and leaf.endswith("_fn"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.005)
            elif leaf.startswith("hc_") and leaf.endswith("_scale"):
                p.fill_(1.0)
            elif leaf.startswith("hc_") and leaf.endswith("_base") and p.numel() > n:
                p[2 * n:].copy_(torch.eye(n).flatten())
        return self

    def num_params(self, active: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        c = self.config
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size
        return total - c.num_hidden_layers * (c.n_routed_experts - c.num_experts_per_tok) * per_expert


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               quantized: str = "keep", decode: str | None = None,
               prefill_dtype: str | torch.dtype | None = None) -> Transformer:
    """A model from a folder holding config.json and safetensors weights (any supported spelling).

    Under an initialised process group (runtime/parallel.py) it is this rank's shard, read slice by slice
    from the checkpoint; a world size that does not split the model is refused before anything is read.
    quantized: "keep" holds FP8 / FP4 weights as stored (runtime/qlinear.py dequantises them on the fly, so
    they take about their file size); "dequantize" expands them into `dtype` at load. `dtype` is that of
    everything else: the other weights, the activations and the cache.
    decode: "fast" or "eager" (Transformer.decode_impl); None: $LONGLENS_DECODE if set, else "fast" (the compiled
    step, runtime/compiled.py, where it applies: on CPU, without a process group; it compiles at the first decode
    step and falls back to the forward, saying so once, where it cannot).
    prefill_dtype: what the HCA layers' dense pass computes in during prefill (Transformer.set_prefill_dtype):
    "auto" (runtime/isa.py: bf16 where the CPU computes bf16 natively, else the model's dtype), "float32",
    "bfloat16", or "model" (the reference); None: $LONGLENS_PREFILL_DTYPE if set, else "auto".
    """
    decode = decode or os.environ.get("LONGLENS_DECODE") or "fast"
    if decode not in ("fast", "eager"):
        raise ValueError(f"decode must be 'fast' or 'eager', got {decode!r}")
    from . import parallel
    from .isa import resolve_prefill

    # a bad name fails here, before anything is read
    dense_dtype = resolve_prefill(prefill_dtype or os.environ.get("LONGLENS_PREFILL_DTYPE") or "auto", device, dtype)
    from .checkpoint import KEEP_FP32, load_state_dict, quantized_weights, read_config
    from .plan import check_world_size

    if quantized not in ("keep", "dequantize"):
        raise ValueError(f"quantized must be 'keep' or 'dequantize', got {quantized!r}")
    raw = read_config(path)
    try:
        cfg = ModelConfig.from_dict(raw)
    except ConfigError as e:  # name the file: the message alone only names the key
        raise ConfigError(f"{Path(path) / 'config.json'}: {str(e).removeprefix('config.json: ')}") from None
    shard = parallel.current()
    check_world_size(cfg, shard.world)  # before anything is read
    with torch.device("meta"):
        model = Transformer(cfg, shard)
        kinds = quantized_weights(path) if quantized == "keep" else {}
        if kinds:
            from .qlinear import FP4Linear, FP8Linear

            block = tuple((raw.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
            for name, kind in kinds.items():
                if parallel.slice_of(name, cfg, shard) is False:
                    continue  # another rank's expert
                parent, _, leaf = name.removesuffix(".weight").rpartition(".")
                owner = model.get_submodule(parent)
                lin = getattr(owner, leaf)
                setattr(owner, leaf, FP8Linear(lin.in_features, lin.out_features, block) if kind == "fp8"
                        else FP4Linear(lin.in_features, lin.out_features))
    expected = {}
    for name, t in model.state_dict().items():
        kept = t.dtype if not t.is_floating_point() or name.endswith(".scale") else \
            torch.float32 if KEEP_FP32.search(name) else dtype
        expected[name] = (tuple(t.shape), kept)
    device = torch.device(device)
    state = load_state_dict(path, expected, dtype, lambda n: parallel.slice_of(n, cfg, shard), device)
    model.load_state_dict(state, assign=True, strict=True)
    for mod in model.modules():  # non-persistent buffers (rope tables) are rebuilt off the meta device
        if isinstance(mod, Attention):
            mod.inv_freq = rope_inv_freq(cfg, compress=mod.compressor is not None)
    model = model.to(device).eval()
    model.decode_impl = decode
    model.set_prefill_dtype(dense_dtype)
    return model
