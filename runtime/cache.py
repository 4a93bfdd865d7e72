"""The per-sequence cache: an explicit object the caller owns, never state on the model.

One cache class per V4 layer type, each holding exactly what that layer needs to continue a sequence:
- `SlidingCache`: `window`, the last sliding_window-1 rows of post-norm, post-RoPE KV (K = V, one
  512-wide row per token in V4) -- constant size;
- `HCACache`: the window plus one compressor state `kv` (128:1 entries);
- `CSACache`: the window plus two compressor states, `kv` (4:1 entries) and `index` (the lightning
  indexer's keys, stored in `Cache.index_dtype`).
A compressor state (`CompressorState`) has `entries` (emitted compressed rows, append-only),
`buffer_kv`/`buffer_gate` (raw projections of tokens that do not fill a pooling window yet; gate
without position bias) and, for the overlapping CSA pooling, `overlap_kv`/`overlap_gate` (the last
complete window's first-half features, gate with position bias added).

Every layer cache, and the whole `Cache`, offers the same small interface:
- `state()` -> {name: tensor} (entries: only the rows in use) and `from_state(...)` to rebuild it --
  what snapshots write and read (runtime/snapshot.py only adds files, fingerprints and atomic writes);
- `mark()` / `rewind(mark)`: the cache's state at one length and the way back to it. Entries are
  append-only and the runtime replaces (never mutates) windows and buffers, so a mark is entry counts
  plus references to a few small tensors; rewinding costs nothing and no prefill is repeated;
- `checkpoint(since)`: the state now, restorable after a branch run from an earlier mark (counterfactuals);
- `reserve(tokens)` sizes entry buffers once for a known context, `trim()` gives spare capacity back;
- `nbytes()` by component.
Entries live in capacity-doubling buffers so a decode step appends in O(1) instead of re-copying the
whole history (which would make decode cost grow with the context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import CSA, HCA, SLIDING, ModelConfig

STATE_FIELDS = ("buffer_kv", "buffer_gate", "overlap_kv", "overlap_gate")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


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
            self._resize(max(need, 2 * (self.data.shape[1] if self.data is not None else 0), 16), like=rows)
        self.data[:, self.n : need] = rows
        self.n = need

    def _resize(self, capacity: int, like: torch.Tensor | None = None) -> None:
        src = self.data if self.data is not None else like
        grown = src.new_empty(src.shape[0], capacity, src.shape[2])
        if self.data is not None:
            grown[:, : self.n] = self.data[:, : self.n]
        self.data = grown

    def reserve(self, rows: int) -> None:
        """Room for `rows` rows in all (a no-op before the first append: the width is unknown then)."""
        if self.data is not None and self.data.shape[1] < rows:
            self._resize(rows)

    def trim(self) -> None:
        """Drop the spare capacity past the rows in use."""
        if self.data is not None and self.data.shape[1] > self.n:
            self.data = self.data[:, : self.n].clone() if self.n else None

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[:, : self.n]

    def nbytes(self) -> int:
        return 0 if self.data is None else self.n * self.data.shape[0] * self.data.shape[2] * self.data.element_size()

    @classmethod
    def from_rows(cls, rows: torch.Tensor, dtype: torch.dtype | None, capacity: int = 0) -> "Entries":
        e = cls(dtype)
        e.data = rows.new_empty(rows.shape[0], max(capacity, rows.shape[1]), rows.shape[2], dtype=dtype or rows.dtype)
        e.data[:, : rows.shape[1]] = rows
        e.n = rows.shape[1]
        return e


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
        return sum(_nbytes(getattr(self, f)) for f in STATE_FIELDS)

    def mark(self) -> tuple:
        return self.entries.n, tuple(getattr(self, f) for f in STATE_FIELDS)

    def rewind(self, mark: tuple) -> None:
        n, tensors = mark
        if n > self.entries.n:
            raise ValueError(f"cannot rewind {self.entries.n} entries forward to {n}")
        self.entries.n = n
        for f, t in zip(STATE_FIELDS, tensors):
            setattr(self, f, t)

    def state(self, prefix: str) -> dict[str, torch.Tensor | None]:
        out = {f"{prefix}.entries": self.entries.view() if self.entries.n else None}
        return out | {f"{prefix}.{f}": getattr(self, f) for f in STATE_FIELDS}

    def load_state(self, prefix: str, tensors: dict, n: int, width: int, capacity: int) -> None:
        if n:
            rows = tensors[f"{prefix}.entries"]
            if rows.shape[1] != n or rows.shape[2] != width:
                raise ValueError(f"{prefix}.entries shape {tuple(rows.shape)}, expected [B, {n}, {width}]")
            self.entries = Entries.from_rows(rows, self.entries.dtype, capacity)
        for f in STATE_FIELDS:
            setattr(self, f, tensors.get(f"{prefix}.{f}"))


@dataclass(frozen=True)
class LayerMark:
    window: torch.Tensor | None
    compressors: dict[str, tuple]  # "kv" / "index" -> (entry count, (buffer_kv, buffer_gate, overlap_kv, overlap_gate))


class LayerCache:
    """A sliding-window-only layer's cache; the base of the compressed layers' caches."""

    layer_type = SLIDING
    compressor_names: tuple[str, ...] = ()  # attributes holding a CompressorState

    def __init__(self, config: ModelConfig, layer: int, index_dtype: torch.dtype | None = None):
        self.config, self.layer = config, layer
        self.window: torch.Tensor | None = None  # [B, <= sliding_window - 1, d]

    def compressors(self) -> list[tuple[str, CompressorState]]:
        return [(n, getattr(self, n)) for n in self.compressor_names]

    # what the attention reads: None where the layer type has no such compressor
    kv: CompressorState | None = None
    index: CompressorState | None = None

    def mark(self) -> LayerMark:
        return LayerMark(self.window, {n: st.mark() for n, st in self.compressors()})

    def rewind(self, mark: LayerMark) -> None:
        self.window = mark.window
        for n, st in self.compressors():
            st.rewind(mark.compressors[n])

    def reserve(self, tokens: int) -> None:
        rate = self.config.rate(self.layer)
        for _, st in self.compressors():
            st.entries.reserve(tokens // rate + 1)

    def trim(self) -> None:
        for _, st in self.compressors():
            st.entries.trim()

    def entry_counts(self) -> dict[str, int]:
        return {n: st.count for n, st in self.compressors()}

    def state(self) -> dict[str, torch.Tensor | None]:
        """Flat tensors named `L{layer}.window`, `L{layer}.{kv|index}.{entries|buffer_kv|...}` (None: absent)."""
        out = {f"L{self.layer}.window": self.window}
        for n, st in self.compressors():
            out |= st.state(f"L{self.layer}.{n}")
        return out

    def load_state(self, tensors: dict, length: int, counts: dict[str, int], reserve_tokens: int = 0) -> None:
        """Fill this (fresh) layer cache from `state()` tensors of a cache at `length` tokens; checks shapes."""
        c, i = self.config, self.layer
        self.window = tensors.get(f"L{i}.window")
        want = min(length, c.sliding_window - 1)
        if (self.window is None) != (length == 0) or (
                self.window is not None and tuple(self.window.shape[1:]) != (want, c.head_dim)):
            raise ValueError(f"layer {i} window shape {None if self.window is None else tuple(self.window.shape)}")
        rate = c.rate(i)
        for n, st in self.compressors():
            count = int(counts[n])
            if count != length // rate:
                raise ValueError(f"L{i}.{n}: {count} entries for {length} tokens at rate {rate}")
            width = c.head_dim if n == "kv" else c.index_head_dim
            st.load_state(f"L{i}.{n}", tensors, count, width, (length + reserve_tokens) // rate + 1)

    def nbytes(self) -> dict[str, int]:
        return {"window": _nbytes(self.window)}


class HCACache(LayerCache):
    layer_type = HCA
    compressor_names = ("kv",)

    def __init__(self, config, layer, index_dtype=None):
        super().__init__(config, layer)
        self.kv = CompressorState()

    def nbytes(self):
        return super().nbytes() | {"hca_entries": self.kv.entries.nbytes(), "buffers": self.kv.buffer_nbytes()}


class CSACache(LayerCache):
    layer_type = CSA
    compressor_names = ("kv", "index")

    def __init__(self, config, layer, index_dtype=None):
        super().__init__(config, layer)
        self.kv = CompressorState()
        self.index = CompressorState(entries=Entries(index_dtype))

    def nbytes(self):
        return super().nbytes() | {"csa_entries": self.kv.entries.nbytes(), "indexer_keys": self.index.entries.nbytes(),
                                   "buffers": self.kv.buffer_nbytes() + self.index.buffer_nbytes()}


LAYER_CACHES = {SLIDING: LayerCache, HCA: HCACache, CSA: CSACache}


@dataclass(frozen=True)
class CacheMark:
    """A cache's state at `length` (Cache.mark()); rewinding to it restores that state exactly."""
    length: int
    layers: tuple[LayerMark, ...]

    def state(self) -> dict[str, torch.Tensor | None]:
        """The marked small tensors, named as in Cache.state() (entries are counts, in `entry_counts`)."""
        out = {}
        for i, lm in enumerate(self.layers):
            out[f"L{i}.window"] = lm.window
            for n, (_, ts) in lm.compressors.items():
                out |= {f"L{i}.{n}.{f}": t for f, t in zip(STATE_FIELDS, ts)}
        return out

    def entry_counts(self) -> dict[str, int]:
        return {f"L{i}.{n}": c for i, lm in enumerate(self.layers) for n, (c, _) in lm.compressors.items()}

    @classmethod
    def from_state(cls, length: int, counts: dict[str, int], tensors: dict, config: ModelConfig) -> "CacheMark":
        layers = []
        for i, t in enumerate(config.layer_types):
            comps = {n: (int(counts[f"L{i}.{n}"]), tuple(tensors.get(f"L{i}.{n}.{f}") for f in STATE_FIELDS))
                     for n in LAYER_CACHES[t].compressor_names}
            layers.append(LayerMark(tensors.get(f"L{i}.window"), comps))
        return cls(int(length), tuple(layers))


class Checkpoint:
    """A cache's state now, restorable after rewinding it to an earlier `since` mark and running on from
    there (a branch, e.g. a counterfactual answer). Windows and compressor buffers are replaced, never
    mutated, so a mark keeps them; a run from `since` overwrites only the entry rows past the mark's
    counts, in place: those rows are copied here and written back by `restore`."""

    def __init__(self, cache: "Cache", since: CacheMark):
        self.cache, self.since, self.now = cache, since, cache.mark()
        self.rows = []
        for lc, lm in zip(cache.layers, since.layers):
            for name, st in lc.compressors():
                rows = st.entries.view()
                self.rows.append(None if rows is None else rows[:, lm.compressors[name][0]:].clone())

    def restore(self) -> None:
        cache, rows = self.cache, iter(self.rows)
        cache.rewind(self.since)
        for lc in cache.layers:
            for _, st in lc.compressors():
                r = next(rows)
                if r is not None:
                    st.entries.append(r)
        cache.length = self.now.length
        cache.rewind(self.now)


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
        self.layers: list[LayerCache] = [LAYER_CACHES[t](config, i, index_dtype) for i, t in enumerate(config.layer_types)]

    # ------------------------------------------------------------------------------------ marks
    def mark(self) -> CacheMark:
        return CacheMark(self.length, tuple(lc.mark() for lc in self.layers))

    def rewind(self, mark: CacheMark) -> None:
        """Return to the state `mark` recorded (a mark of this cache, at or before now)."""
        if mark.length > self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} tokens forward to {mark.length}")
        for lc, lm in zip(self.layers, mark.layers):
            lc.rewind(lm)
        self.length = mark.length

    def checkpoint(self, since: CacheMark) -> Checkpoint:
        """The state now, to come back to after rewinding to `since` and running another branch."""
        return Checkpoint(self, since)

    def reserve(self, tokens: int) -> None:
        """Give every entry buffer room for `tokens` context tokens, so growth never copies twice the cache."""
        for lc in self.layers:
            lc.reserve(tokens)

    def trim(self) -> None:
        """Give back entry capacity past what is in use (e.g. before keeping an idle cache)."""
        for lc in self.layers:
            lc.trim()

    # ------------------------------------------------------------------------------------ state
    def state(self) -> dict[str, torch.Tensor | None]:
        out = {}
        for lc in self.layers:
            out |= lc.state()
        return out

    def entry_counts(self) -> dict[str, int]:
        """Compressed entries per compressor, named "L{layer}.kv" / "L{layer}.index"."""
        return {f"L{lc.layer}.{n}": c for lc in self.layers for n, c in lc.entry_counts().items()}

    @classmethod
    def from_state(cls, config: ModelConfig, tensors: dict, length: int, counts: dict[str, int], batch_size: int = 1,
                   index_dtype: torch.dtype | None = None, reserve_tokens: int = 0) -> "Cache":
        """A cache from `state()` tensors and `entry_counts()` of one at `length` tokens (shapes checked:
        ValueError/KeyError when they do not fit `config`); entry buffers get room for `reserve_tokens` more."""
        cache = cls(config, batch_size, index_dtype)
        cache.length = int(length)
        for lc in cache.layers:
            lc.load_state(tensors, cache.length, {n: counts[f"L{lc.layer}.{n}"] for n in lc.compressor_names},
                          reserve_tokens)
        return cache

    # ------------------------------------------------------------------------------------ sizes
    def nbytes(self) -> dict[str, int]:
        """Bytes held, by component (entries counted as stored rows, not spare capacity)."""
        out = dict(window=0, csa_entries=0, indexer_keys=0, hca_entries=0, buffers=0)
        for lc in self.layers:
            for k, v in lc.nbytes().items():
                out[k] += v
        out["total"] = sum(out.values())
        return out

    def dense_nbytes(self, element_size: int | None = None) -> int:
        """What a dense cache of the same model would hold: every token's K=V row in every layer."""
        if element_size is None:
            w = next((lc.window for lc in self.layers if lc.window is not None), None)
            element_size = w.element_size() if w is not None else 4
        c = self.config
        return c.num_hidden_layers * self.batch_size * self.length * c.head_dim * element_size


def compressed_layers(config: ModelConfig, kind: str) -> list[int]:
    return [i for i, t in enumerate(config.layer_types) if t == kind]


__all__ = ["Cache", "CacheMark", "Checkpoint", "CompressorState", "CSACache", "Entries", "HCACache", "LayerCache", "LayerMark",
           "STATE_FIELDS", "compressed_layers", "CSA", "HCA", "SLIDING"]
