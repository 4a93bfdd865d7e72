"""What a session may hold: the context limit, the tokens kept for the conversation, and the cache's
memory budget -- checked before any prefill, so a corpus that does not fit is refused up front with how
much would fit (nothing is truncated).

The cache's size per context token comes from the config (CSA entries + indexer keys per 4 tokens,
HCA entries per 128; the sliding windows and pooling buffers are fixed; runtime/plan.py's arithmetic, which
the multi-GPU planner shares), so the estimate needs no model run. The memory available is the host's
(/proc/meminfo) on the CPU and the device's free memory on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import ModelConfig
from .errors import ContextTooLarge
from .plan import cache_bytes_per_token, fixed_cache_bytes


def mem_available(device: str | torch.device = "cpu") -> int | None:
    """Bytes this process could still allocate on `device` (None: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks PyTorch's caching allocator keeps but no tensor uses are this process's to reuse
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@dataclass
class Budget:
    config: ModelConfig
    dtype: torch.dtype  # the model's (cache rows)
    index_dtype: torch.dtype | None = None  # indexer keys (None: the model's dtype)
    max_context_tokens: int | None = None
    memory_budget_bytes: int | None = None  # None: 80% of the memory available when checking
    chat_reserve_tokens: int = 4096
    device: str | torch.device = "cpu"  # where caches live: whose free memory the budget reads

    def context_limit(self) -> tuple[int, str]:
        """(tokens, why): the most context tokens any session may hold."""
        n, why = self.config.max_position_embeddings, "the model's context (max_position_embeddings)"
        if self.max_context_tokens is not None and self.max_context_tokens < n:
            n, why = self.max_context_tokens, "the engine's max_context_tokens"
        return n, why

    def reserve_tokens(self) -> int:
        """Context kept free for the conversation after a corpus: chat_reserve_tokens, at most a quarter."""
        return min(self.chat_reserve_tokens, self.context_limit()[0] // 4)

    def cache_bytes_per_token(self) -> float:
        """Cache growth per context token: CSA entries + indexer keys, HCA entries (window is fixed)."""
        index_el = None if self.index_dtype is None else self.index_dtype.itemsize
        return cache_bytes_per_token(self.config, self.dtype.itemsize, index_el)

    def fixed_cache_bytes(self) -> int:
        """Bytes that do not grow: sliding windows and pooling buffers (upper bound, fp32 buffers)."""
        return fixed_cache_bytes(self.config, self.dtype.itemsize)

    def estimate_cache_bytes(self, tokens: int) -> int:
        return int(self.fixed_cache_bytes() + self.cache_bytes_per_token() * tokens)

    def memory_budget(self) -> tuple[int | None, str]:
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes, "the engine's memory_budget_bytes"
        avail = mem_available(self.device)
        if avail is None:
            return None, "unknown (available memory could not be read)"
        where = f" on {self.device}" if torch.device(self.device).type != "cpu" else ""
        return int(0.8 * avail), f"80% of the {fmt_bytes(avail)} of memory available{where} now"

    def check_fits(self, tokens: int, documents: Sequence[tuple[str, int]] = ()) -> None:
        """Raise ContextTooLarge unless a context of `tokens` (+ the chat reserve) fits every limit.

        `documents`: optional (name, tokens) pairs, to name the largest ones in the message.
        """
        reserve = self.reserve_tokens()
        limit, why = self.context_limit()
        budget, budget_why = self.memory_budget()
        problems, fits = [], limit - reserve
        if tokens + reserve > limit:
            problems.append(f"{why} is {limit:,} tokens, {reserve:,} of which are kept for the conversation")
        if budget is not None:
            need = self.estimate_cache_bytes(tokens + reserve)
            by_memory = int((budget - self.fixed_cache_bytes()) / max(self.cache_bytes_per_token(), 1e-9)) - reserve
            fits = min(fits, by_memory)
            if need > budget:
                problems.append(f"its cache would need about {fmt_bytes(need)} but the memory budget is "
                                f"{fmt_bytes(budget)} ({budget_why})")
        if not problems:
            return
        fits = max(fits, 0)
        msg = (f"the corpus is too large: {tokens:,} tokens (with the chat preamble) but at most {fits:,} fit; "
               + "; ".join(problems) + f". Remove about {tokens - fits:,} tokens ({(tokens - fits) / tokens:.0%})"
               " of input; nothing was truncated.")
        big = sorted(documents, key=lambda d: -d[1])[:3]
        if big:
            msg += " Largest documents: " + ", ".join(f"{n} ({t:,} tokens)" for n, t in big) + "."
        raise ContextTooLarge(msg, tokens, fits)


__all__ = ["Budget", "fmt_bytes", "mem_available"]
