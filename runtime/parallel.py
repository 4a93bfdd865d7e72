"""Tensor and expert parallelism over torch.distributed: which slice of the model this rank holds.

The scheme is DeepSeek's official one for V4 inference, with one change:
- attention: query heads split across ranks (`wq_b` rows, `attn_sink`), output groups too (`wo_a` rows),
  `wo_b` split by input columns and summed with one all-reduce;
- embedding and head split by vocabulary (the embedding's partial rows summed, the head's logits gathered);
- routed experts split by index (each rank runs its own on every token, one all-reduce of the routed sum);
- replicated: `wq_a`, `wkv`, norms, mHC, compressors, the MoE gate and shared expert, and -- unlike the
  official code, which splits index heads and all-reduces a [tokens x entries] score matrix (hundreds of GB
  per layer over a 1M-token prefill) -- the whole lightning indexer. Every rank scores the same keys with
  the same weights, so the top-k is the same on every rank with no communication.

Under torchrun the process group is set up by `init_from_env()`; `current()` then describes this rank and
`runtime.load_model` returns its shard. Without a process group (or with one of size 1) every helper here is
the identity, so single-process numerics are untouched.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ModelConfig


@dataclass(frozen=True)
class Shard:
    """This rank's place: `rank` of `world` (1 = the whole model in one process)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def span(self, n: int) -> tuple[int, int]:
        """This rank's [start, stop) of n items split evenly (n divisible by world, checked at load)."""
        per = n // self.world
        return self.rank * per, (self.rank + 1) * per


SINGLE = Shard()


def current() -> Shard:
    """The shard of this process: from the default process group when one is initialised, else SINGLE."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return SINGLE


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto", timeout_s: float = 600.0) -> tuple[Shard, torch.device]:
    """Under torchrun (WORLD_SIZE > 1): initialise the default group (NCCL on CUDA, gloo on CPU) and return
    (this rank's shard, its device: cuda:LOCAL_RANK or cpu). Outside torchrun: (SINGLE, the device asked)."""
    if not under_torchrun():
        return SINGLE, _resolve(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = _resolve(device, local)
    if not dist.is_initialized():
        backend = "nccl" if want.type == "cuda" else "gloo"
        if want.type == "cuda":
            torch.cuda.set_device(want)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=want if want.type == "cuda" else None)
        atexit.register(shutdown)
    return current(), want


def shutdown() -> None:
    """Destroy every process group now, while the interpreter is whole: gloo's threads still running when the
    process exits can abort it ("terminate called without an active exception"). Safe to call twice."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 -- a failed peer: nothing left to tear down cleanly
            pass


def _resolve(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device(f"cuda:{local_rank}")
    return d


# ------------------------------------------------------------------------------------------ collectives
def all_reduce(t: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Sum of t over ranks, in place (identity on one process)."""
    if shard.active:
        dist.all_reduce(t)
    return t


def gather_last(t: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Every rank's t joined along the last axis in rank order (identity on one process)."""
    if not shard.active:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(shard.world)]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=-1)


# ------------------------------------------------------------------------------------------ load plan
def slice_of(name: str, cfg: ModelConfig, shard: Shard) -> tuple[int, int, int] | None | bool:
    """How this rank holds checkpoint tensor `name` (official naming): None = whole (replicated),
    (dim, start, stop) = that slice, False = not at all (another rank's expert)."""
    if not shard.active:
        return None
    parts = name.split(".")
    if name in ("embed.weight", "head.weight"):
        return (0, *shard.span(cfg.vocab_size))
    if len(parts) < 4 or parts[0] != "layers":
        return None
    if parts[2] == "ffn" and parts[3] == "experts" and parts[4].isdigit():
        lo, hi = shard.span(cfg.n_routed_experts)
        return None if lo <= int(parts[4]) < hi else False
    if parts[2] != "attn" or parts[3] in ("indexer", "compressor"):
        return None
    H, d = cfg.num_attention_heads, cfg.head_dim
    if parts[3] == "attn_sink":
        return (0, *shard.span(H))
    if parts[3] == "wq_b":
        return (0, *(i * d for i in shard.span(H)))
    if parts[3] == "wo_a":
        return (0, *(i * cfg.o_lora_rank for i in shard.span(cfg.o_groups)))
    if parts[3] == "wo_b":
        return (1, *(i * cfg.o_lora_rank for i in shard.span(cfg.o_groups)))
    return None


__all__ = ["SINGLE", "Shard", "all_reduce", "current", "gather_last", "init_from_env", "shutdown",
           "slice_of", "under_torchrun"]
