"""Time split by layer type, with forward hooks and thin wrappers: exclusive wall time per category.

Why this and not torch.profiler: on CPU every op is synchronous, so a `perf_counter` pair around a
module call is that call's exact time. The timer brackets ~10 regions per layer per call (plus
two per query block of a CSA layer), i.e. tens of microseconds per forward, against milliseconds
of work; record_function would add a profiler event per op. The timer keeps a stack, so nested
regions (the indexer inside a CSA attention call) are subtracted from their parent ("exclusive").
On CUDA each boundary synchronises, which serialises the stream: the split is then right but the
total is a little slower than unhooked.

Categories (the same as bench.flops):
  sliding_attn   attention of sliding-window-only layers (projections, window band, output)
  csa_attn       attention of CSA layers: projections, window band, gathered top-k entries, output
  csa_compress   the CSA layer's two compressors (KV entries and indexer keys)
  indexer        lightning-indexer queries, scoring against every entry, top-k selection
  hca_attn       attention of HCA layers: projections, window band, dense over its entries, output
  hca_compress   the HCA layer's compressor
  moe            gate, routed experts, shared expert
  mhc            hyper-connection weights (incl. Sinkhorn), collapse, expand, and the final hyper-head collapse
  other          the rest of the forward (embedding, sub-layer norms, final norm, vocabulary head, glue)

The wrappers patch the module globals `runtime.attention.select_topk` and
`runtime.model.hc_weights/hc_collapse/hc_expand` and per-instance `indexer.queries/scores`;
`close()` restores them. Nothing in runtime/ is edited.
"""

from __future__ import annotations

import time
from collections import defaultdict

CATEGORIES = ("sliding_attn", "csa_attn", "csa_compress", "indexer", "hca_attn", "hca_compress", "moe", "mhc",
              "other")
_ATTN = {"sliding_attention": "sliding_attn", "compressed_sparse_attention": "csa_attn",
         "heavily_compressed_attention": "hca_attn"}
_COMP = {"compressed_sparse_attention": "csa_compress", "heavily_compressed_attention": "hca_compress"}


class LayerTimer:
    def __init__(self, model, device: str = "cpu"):
        import runtime.attention as ra
        import runtime.model as rm

        self.sync = None
        if str(device).startswith("cuda"):
            import torch
            self.sync = torch.cuda.synchronize
        self.totals = defaultdict(float)
        self.calls = defaultdict(int)
        self._stack: list[list] = []
        self._handles = []
        self._restore = []
        self.enabled = True

        def hook(module, cat):
            self._handles.append(module.register_forward_pre_hook(lambda m, a: self._enter(cat)))
            self._handles.append(module.register_forward_hook(lambda m, a, o: self._exit()))

        for block in model.layers:
            attn = block.attn
            hook(attn, _ATTN[attn.layer_type])
            hook(block.ffn, "moe")
            if attn.compressor is not None:
                hook(attn.compressor, _COMP[attn.layer_type])
            if attn.indexer is not None:
                ix = attn.indexer
                hook(ix.compressor, "csa_compress")
                for name in ("queries", "scores"):
                    setattr(ix, name, self._wrap(getattr(ix, name), "indexer"))
                    self._restore.append((ix.__dict__, name, None))
        for mod, names, cat in ((ra, ("select_topk",), "indexer"),
                                (rm, ("hc_weights", "hc_collapse", "hc_expand"), "mhc")):
            for name in names:
                orig = getattr(mod, name)
                self._restore.append((mod.__dict__, name, orig))
                setattr(mod, name, self._wrap(orig, cat))

    def _wrap(self, fn, cat):
        def timed(*a, **k):
            self._enter(cat)
            try:
                return fn(*a, **k)
            finally:
                self._exit()
        timed.__wrapped__ = fn
        return timed

    def _enter(self, cat):
        if self.sync:
            self.sync()
        self._stack.append([cat, time.perf_counter(), 0.0])

    def _exit(self):
        if self.sync:
            self.sync()
        cat, t0, child = self._stack.pop()
        dt = time.perf_counter() - t0
        if self.enabled:
            self.totals[cat] += dt - child
            self.calls[cat] += 1
        if self._stack:
            self._stack[-1][2] += dt

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()

    def snapshot(self, wall: float) -> dict[str, float]:
        """Seconds per category since reset(); `other` = wall - the timed categories."""
        out = {c: self.totals.get(c, 0.0) for c in CATEGORIES if c != "other"}
        out["other"] = max(0.0, wall - sum(out.values()))
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for ns, name, orig in reversed(self._restore):
            if orig is None:
                ns.pop(name, None)
            else:
                ns[name] = orig
        self._restore.clear()
