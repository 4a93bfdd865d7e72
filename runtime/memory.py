"""Giving freed heap memory back to the OS (glibc; a no-op elsewhere). No torch here.

Long prefills allocate and free hundreds of MiB of temporaries per chunk, in sizes that change as the context
grows. With the tuning the benchmarks and the app's prefills use (no mmap for large blocks, no automatic trim:
faster, as freed blocks are reused without page faults) glibc kept the pieces it could not reuse: over a 1M-token
prefill RSS grew by ~6 MiB per 4k-token chunk while the live tensors stayed at the model plus the cache, and the
peak came out anywhere from 2.1 to 4.1 GB depending on unrelated code changes. `trim_heap` after each chunk
(engine and benchmark) hands those pages back: peak RSS 1.0 GB at 1M tokens (bench/results), at ~5% of the
chunk time (48 chunks: 30.5 s against 29.0 s).
"""

from __future__ import annotations

import ctypes

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 -- both must exist (glibc)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def trim_heap() -> None:
    """Return the heap's free pages to the OS (`malloc_trim`)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def mallopt(params: dict[int, int]) -> None:
    """Set glibc malloc parameters (`mallopt(param, value)` each)."""
    libc = _libc()
    if libc is not None:
        for k, v in params.items():
            libc.mallopt(k, v)


__all__ = ["mallopt", "trim_heap"]
