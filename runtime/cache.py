"""The per-sequence cache: an explicit object the caller owns, never state on the model.

Per layer it holds what DeepSeek-V4 needs to continue a sequence exactly:
- `window`: the last sliding_window-1 rows of post-norm, post-RoPE KV (K = V, one 512-wide row per
  token in V4) -- constant size;
- per compressor (`kv` on CSA/HCA layers, `index` for the CSA lightning indexer):
  `entries` (emitted compressed rows, append-only), `buffer_kv`/`buffer_gate` (raw projections of
  tokens that do not fill a pooling window yet; gate without position bias) and, for the
  overlapping CSA pooling, `overlap_kv`/`overlap_gate` (the last complete window's first-half
  features, gate with position bias added).

Entries live in capacity-doubling buffers so a decode step appends in O(1) instead of re-copying
the whole history (which would make decode cost grow with the context). The cache only grows:
there is no rewind, so a new prompt that does not extend the cached tokens needs a new cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import CSA, HCA, SLIDING, ModelConfig


class Entries:
    """Append-only [B, N, C] rows with amortised O(1) appends, stored in `dtype` (None: as given)."""

    def __init__(self, dtype: torch.dtype | None = None):
        self.data: torch.Tensor | None = None
        self.n = 0
        self.dtype = dtype

    def append(self, rows: torch.Tensor) -> None:
        if rows.shape[1] == 0:
            return
        if self.dtype is not None:
            rows = rows.to(self.dtype)
        need = self.n + rows.shape[1]
        if self.data is None or need > self.data.shape[1]:
            cap = max(need, 2 * (self.data.shape[1] if self.data is not None else 0), 16)
            grown = rows.new_empty(rows.shape[0], cap, rows.shape[2])
            if self.data is not None:
                grown[:, : self.n] = self.data[:, : self.n]
            self.data = grown
        self.data[:, self.n : need] = rows
        self.n = need

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[:, : self.n]

    def nbytes(self) -> int:
        return 0 if self.data is None else self.n * self.data.shape[0] * self.data.shape[2] * self.data.element_size()


@dataclass
class CompressorState:
    entries: Entries = field(default_factory=Entries)
    buffer_kv: torch.Tensor | None = None
    buffer_gate: torch.Tensor | None = None
    overlap_kv: torch.Tensor | None = None
    overlap_gate: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.entries.n

    def buffer_nbytes(self) -> int:
        ts = (self.buffer_kv, self.buffer_gate, self.overlap_kv, self.overlap_gate)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class LayerCache:
    layer_type: str
    window: torch.Tensor | None = None  # [B, <= sliding_window - 1, d]
    kv: CompressorState | None = None
    index: CompressorState | None = None


class Cache:
    """Everything needed to continue one batch of sequences; `length` tokens processed so far.

    `index_dtype` stores the lightning indexer's keys in that dtype (None: the model's). bf16 halves
    the bytes the indexer streams per query -- its whole cost at long context -- and scores run as
    bf16 matmuls (AMX on CPU); DeepSeek-V4 itself keeps these keys in FP8. Both attention paths read
    the same keys, but a bf16 matmul rounds each score to bf16 after an accumulation whose order depends
    on the call's shape: chunked vs whole and sparse vs eager then agree to one bf16 ulp of the scores,
    and a near-tie at the k-th pick can flip (tests/test_cache.py::test_bf16_indexer_keys).
    """

    def __init__(self, config: ModelConfig, batch_size: int = 1, index_dtype: torch.dtype | None = None):
        self.config = config
        self.batch_size = batch_size
        self.index_dtype = index_dtype
        self.length = 0
        self.layers = []
        for t in config.layer_types:
            lc = LayerCache(t)
            if t != SLIDING:
                lc.kv = CompressorState()
            if t == CSA:
                lc.index = CompressorState(entries=Entries(index_dtype))
            self.layers.append(lc)

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by component (entries counted as stored rows, not spare capacity)."""
        out = dict(window=0, csa_entries=0, indexer_keys=0, hca_entries=0, buffers=0)
        for lc in self.layers:
            if lc.window is not None:
                out["window"] += lc.window.numel() * lc.window.element_size()
            if lc.kv is not None:
                out["csa_entries" if lc.layer_type == CSA else "hca_entries"] += lc.kv.entries.nbytes()
                out["buffers"] += lc.kv.buffer_nbytes()
            if lc.index is not None:
                out["indexer_keys"] += lc.index.entries.nbytes()
                out["buffers"] += lc.index.buffer_nbytes()
        out["total"] = sum(out.values())
        return out

    def dense_nbytes(self, element_size: int | None = None) -> int:
        """What a dense cache of the same model would hold: every token's K=V row in every layer."""
        if element_size is None:
            w = next((lc.window for lc in self.layers if lc.window is not None), None)
            element_size = w.element_size() if w is not None else 4
        c = self.config
        return c.num_hidden_layers * self.batch_size * self.length * c.head_dim * element_size

    def entry_counts(self) -> dict[int, int]:
        """Compressed entries per layer (CSA and HCA layers)."""
        return {i: lc.kv.count for i, lc in enumerate(self.layers) if lc.kv is not None}


def compressed_layers(config: ModelConfig, kind: str) -> list[int]:
    return [i for i, t in enumerate(config.layer_types) if t == kind]


__all__ = ["Cache", "LayerCache", "CompressorState", "Entries", "compressed_layers", "CSA", "HCA", "SLIDING"]
