"""Wall time by part of the model: the benchmark's time split and the engine's seconds per layer kind.

`LayerTimer(model)` times every forward of `model` while it is attached, in one of two granularities:
- detail=True (bench/worker.py): exclusive seconds per category of CATEGORIES:
    sliding_attn   attention of sliding-window-only layers (projections, window band, output)
    csa_attn       attention of CSA layers: projections, window band, gathered top-k entries, output
    csa_compress   the CSA layer's two compressors (KV entries and indexer keys)
    indexer        lightning-indexer queries, scoring against every entry, top-k selection
    hca_attn       attention of HCA layers: projections, window band, dense over its entries, output
    hca_compress   the HCA layer's compressor
    moe            gate, routed experts, shared expert
    mhc            hyper-connection weights (incl. Sinkhorn), collapse, expand, and the final hyper-head
    other          the rest of the forward (embedding, sub-layer norms, final norm, vocabulary head, glue):
                   what snapshot(wall) leaves of the wall time
- detail=False (the engine's PrefillProgress.layer_s): seconds of each attention module by its layer
  kind (config.SHORT: "sliding", "csa", "hca") and of the MoE modules ("moe"); nothing else is hooked.

How it attaches, with nothing patched: the module categories through forward pre/post hooks, and the
function-level regions (mHC, indexer queries, scoring and top-k) through `with region(self.timer, cat):`
blocks in runtime/model.py and runtime/attention.py, live once `model.attach_timer(timer)` has set
the modules' `timer` attribute. Without a timer (the default) `region` hands back one shared context
that does nothing: a function call and an empty `with`, ~0.1 us, about 4 per layer per forward.

Why wall time and not torch.profiler: on CPU every op is synchronous, so a perf_counter pair around a
module call is that call's exact time, and a forward crosses a few boundaries per layer against
milliseconds of work; record_function would add a profiler event per op. Regions nest (the indexer
inside a CSA attention call): a stack subtracts each from its parent, so the times are exclusive and
sum to the timed wall time. On CUDA each boundary synchronises, which serialises the stream: the split
is then right but the total is a little slower than untimed.

Torch is imported only when a CUDA timer needs it: bench/report.py reads CATEGORIES without it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from .config import CSA, HCA, LAYER_TYPES, SHORT

CATEGORIES = ("sliding_attn", "csa_attn", "csa_compress", "indexer", "hca_attn", "hca_compress", "moe", "mhc",
              "other")
ATTN_CATEGORY = {t: f"{SHORT[t]}_attn" for t in LAYER_TYPES}
COMPRESS_CATEGORY = {t: f"{SHORT[t]}_compress" for t in (CSA, HCA)}
COARSE = (*SHORT.values(), "moe")  # detail=False: attention by layer kind, MoE


class _NoRegion:
    """The context `region` returns without a timer: does nothing, shared by every call."""

    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc) -> bool:
        return False


class _Region:
    __slots__ = ("timer", "category")

    def __init__(self, timer: "LayerTimer", category: str):
        self.timer, self.category = timer, category

    def __enter__(self):
        self.timer._enter(self.category)

    def __exit__(self, *exc) -> bool:
        self.timer._exit()
        return False


_NO_REGION = _NoRegion()


def region(timer: "LayerTimer | None", category: str):
    """`with region(self.timer, "mhc"):` times the block as `category` under an attached timer; else nothing."""
    return _NO_REGION if timer is None else _Region(timer, category)


class LayerTimer:
    """Seconds per category of `model`'s forwards while attached (see the module docstring).

    attach=True (default): attached from construction until close(), e.g. `with LayerTimer(model) as t:`.
    attach=False: attached only inside `with timer.active():` (the engine wraps each of its own forwards,
    so nothing else run on the model meanwhile is counted). Totals add up across attachments until reset().
    A detailed timer sets the model's region hooks (`model.attach_timer`): one at a time per model.
    """

    def __init__(self, model, device=None, *, detail: bool = True, attach: bool = True):
        self.model, self.detail = model, detail
        self._sync = None
        if str(device if device is not None else model.device).startswith("cuda"):
            import torch
            # CUDA runs asynchronously: synchronise at each boundary to time what ran, not what was queued
            self._sync = torch.cuda.synchronize
        self.totals: dict[str, float] = {}  # exclusive seconds per category, only those timed so far
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []  # [category, start, seconds of nested regions]
        self._handles: list = []
        if attach:
            self.attach()

    # ------------------------------------------------------------------------------------ attach
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "LayerTimer":
        """Registers the hooks (and, detailed, the model's regions); a no-op when already attached."""
        if self.attached:
            return self
        if self.detail and getattr(self.model, "timer", None) is not None:
            raise RuntimeError("another detailed LayerTimer is attached to this model; close() it first")
        for block in self.model.layers:
            attn = block.attn
            if not self.detail:
                self._hook(attn, SHORT[attn.layer_type])
                self._hook(block.ffn, "moe")
                continue
            self._hook(attn, ATTN_CATEGORY[attn.layer_type])
            self._hook(block.ffn, "moe")
            if attn.compressor is not None:
                self._hook(attn.compressor, COMPRESS_CATEGORY[attn.layer_type])
            if attn.indexer is not None:
                self._hook(attn.indexer.compressor, COMPRESS_CATEGORY[CSA])
        if self.detail:
            self.model.attach_timer(self)
        return self

    def _hook(self, module, category: str) -> None:
        self._handles.append(module.register_forward_pre_hook(lambda m, args: self._enter(category)))
        # always_call: the region closes even when the forward raises, so the stack stays balanced
        self._handles.append(module.register_forward_hook(lambda m, args, out: self._exit(), always_call=True))

    def close(self) -> None:
        """Removes every hook and the model's regions; the totals stay. Safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        if self.detail and getattr(self.model, "timer", None) is self:
            self.model.attach_timer(None)

    @contextmanager
    def active(self):
        """Attached for the duration of the block (left attached if it already was)."""
        was = self.attached
        self.attach()
        try:
            yield self
        finally:
            if not was:
                self.close()

    def __enter__(self) -> "LayerTimer":
        return self.attach()

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # ------------------------------------------------------------------------------------ timing
    def _enter(self, category: str) -> None:
        if self._sync:
            self._sync()
        self._stack.append([category, time.perf_counter(), 0.0])

    def _exit(self) -> None:
        if self._sync:
            self._sync()
        category, t0, nested = self._stack.pop()
        dt = time.perf_counter() - t0
        self.totals[category] = self.totals.get(category, 0.0) + dt - nested
        self.calls[category] = self.calls.get(category, 0) + 1
        if self._stack:
            self._stack[-1][2] += dt

    # ------------------------------------------------------------------------------------ results
    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per category timed so far (a copy; categories never entered are absent)."""
        return dict(self.totals)

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()

    def snapshot(self, wall: float | None = None) -> dict[str, float]:
        """Seconds of every category of this granularity since reset() (0.0 if never entered); with the
        timed span's `wall` seconds, also "other" = wall - the timed categories."""
        names = [c for c in CATEGORIES if c != "other"] if self.detail else list(COARSE)
        out = {c: self.totals.get(c, 0.0) for c in names}
        if wall is not None:
            out["other"] = max(0.0, wall - sum(out.values()))
        return out


__all__ = ["ATTN_CATEGORY", "CATEGORIES", "COARSE", "COMPRESS_CATEGORY", "LayerTimer", "region"]
