"""What the inspector computes across answers: a compact record of each answer's CSA selection, the
corpus coverage of a whole conversation, and the comparison of two answers.

Inputs are plain data, read by attribute only (nothing here imports the runtime):
- a provenance (runtime Provenance: `n_context`, `rates`, `csa`, `csa_counts`), summarised once per
  answer by `summarize` into a `TurnSummary`: per CSA layer, the ids of the entries the indexer
  picked for any of the answer's tokens and the attention weight each received, summed over them.
  That is what a conversation keeps of its earlier answers (the whole provenance, with its per-token
  picks, is kept for the last answer only): sparse, so its size grows with the answer's length and
  the top-k, not with the context.
- docs: (name, start, end) context positions of each document's text (`text_spans` makes them from a
  runtime Layout, whose "### File:" headers and separators are no document's text);
- a layout (runtime Layout: `locate(a, b)` -> spans with `name`, `line_start`, `line_end`) and its
  `offset` (the context position of layout token 0), to name file lines;
- sources (runtime Source: `file`, `line_start`, `line_end`, `weight`).

Entry w of a layer with rate m covers context tokens [w*m, (w+1)*m); only closed entries exist
(n_context // m of them). Coverage counts entries on the grid of the CSA rate: an entry is read when
any CSA layer picked it for any answer token of any answer.

Pure: numpy and the standard library; no gradio, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

SUMMARY_BYTES = 64 << 20  # most bytes of answer summaries a conversation keeps (the oldest go first)


# ------------------------------------------------------------------------------------ one answer
@dataclass(frozen=True)
class TurnSummary:
    """One answer's CSA selection: per layer, the picked entry ids (ascending) and their summed weight."""
    n_context: int  # context length the entry ids refer to
    rates: dict[int, int]  # CSA layer -> rate
    picks: dict[int, tuple[np.ndarray, np.ndarray]]  # CSA layer -> (ids int32, weights float32)

    @property
    def nbytes(self) -> int:
        return sum(ids.nbytes + w.nbytes for ids, w in self.picks.values())

    def dense(self, layer: int, n_context: int | None = None) -> np.ndarray:
        """Weight per entry of `layer` over a context of `n_context` tokens (default: this answer's)."""
        n = (n_context or self.n_context) // self.rates[layer]
        out = np.zeros(n)
        ids, w = self.picks[layer]
        ok = ids < n
        out[ids[ok]] = w[ok]
        return out

    def selection(self, n_context: int | None = None) -> dict[int, np.ndarray]:
        """{CSA layer: weight per entry}, as runtime/figures.py's heatmaps take it."""
        return {layer: self.dense(layer, n_context) for layer in sorted(self.picks)}

    def picked(self, layer: int) -> set[int]:
        return set(self.picks[layer][0].tolist()) if layer in self.picks else set()


def summarize(provenance) -> TurnSummary | None:
    """The compact record of a whole answer's CSA selection (None for no provenance). An entry counts
    as picked when the indexer chose it for at least one answer token (`csa_counts`), whatever weight
    the attention then gave it."""
    if provenance is None:
        return None
    picks, rates = {}, {}
    for layer, weights in provenance.csa.items():
        counts = provenance.csa_counts.get(layer) if provenance.csa_counts else None
        chosen = np.asarray(counts if counts is not None else weights) > 0
        ids = np.flatnonzero(chosen)
        picks[layer] = (ids.astype(np.int32), np.asarray(weights, dtype=np.float64)[ids].astype(np.float32))
        rates[layer] = int(provenance.rates[layer])
    return TurnSummary(int(provenance.n_context), rates, picks)


def within_budget(sizes: Sequence[int], budget: int = SUMMARY_BYTES) -> int:
    """Index of the oldest summary to keep so that the newest ones fit `budget` bytes (the newest is
    always kept): sizes are oldest first."""
    total, keep = 0, len(sizes)
    for i in range(len(sizes) - 1, -1, -1):
        total += sizes[i]
        if total > budget and i < len(sizes) - 1:
            break
        keep = i
    return keep


# ------------------------------------------------------------------------------------ coverage
@dataclass(frozen=True)
class Region:
    """A run of a document's text that no answer read: lines [line_start, line_end], context tokens
    [token_start, token_end)."""
    name: str
    line_start: int
    line_end: int
    token_start: int
    token_end: int

    @property
    def tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def lines(self) -> str:
        return f"{self.line_start}" if self.line_end == self.line_start else f"{self.line_start}-{self.line_end}"

    @property
    def target(self) -> str:
        """The source viewer's target (app/inspector_view.py: parse_target)."""
        return f"file:{self.name}:{self.lines}"


@dataclass(frozen=True)
class DocCoverage:
    name: str
    entries: int  # closed CSA entries holding some of its text
    read: int  # of them, picked by some CSA layer for some answer
    mass: float  # attention weight its text received: summed over answers, answer tokens and CSA layers
    mass_share: float  # of the mass that landed on any document's text
    regions: list[Region]  # never-read runs, longest first

    @property
    def share(self) -> float:
        return self.read / self.entries if self.entries else 0.0


@dataclass(frozen=True)
class Coverage:
    docs: list[DocCoverage]
    answers: int  # answers counted
    rate: int  # tokens per entry of the grid
    n_context: int
    read_masks: list[np.ndarray] = field(repr=False)  # per answer: bool per grid entry
    read_any: np.ndarray = field(repr=False)  # any answer

    @property
    def entries(self) -> int:
        return sum(d.entries for d in self.docs)

    @property
    def read(self) -> int:
        return sum(d.read for d in self.docs)

    @property
    def share(self) -> float:
        return self.read / self.entries if self.entries else 0.0

    @property
    def mass(self) -> float:
        return sum(d.mass for d in self.docs)

    def regions(self, top: int | None = None) -> list[Region]:
        """The never-read regions of every document, longest first."""
        out = sorted((r for d in self.docs for r in d.regions), key=lambda r: (-r.tokens, r.token_start))
        return out[:top]


def text_spans(layout, offset: int) -> list[tuple[str, int, int]]:
    """(name, start, end) context positions of each document's text."""
    if layout is None:
        return []
    return [(d.name, d.text_start + offset, d.text_end + offset) for d in layout.documents]


def _grid_ids(ids: np.ndarray, rate: int, grid: int) -> np.ndarray:
    """Entries of the `grid`-token grid that entries `ids` of `rate` tokens cover."""
    if rate == grid:
        return ids.astype(np.int64)
    if rate % grid:
        raise ValueError(f"a rate-{rate} entry does not cover whole entries of {grid} tokens")
    k = rate // grid
    return (ids.astype(np.int64)[:, None] * k + np.arange(k)).ravel()


def read_mask(summary: TurnSummary, n_context: int, rate: int) -> np.ndarray:
    """Bool per closed `rate`-token entry of `n_context` tokens: picked by any CSA layer of the answer."""
    mask = np.zeros(n_context // rate, dtype=bool)
    for layer, (ids, _) in summary.picks.items():
        g = _grid_ids(ids, summary.rates[layer], rate)
        mask[g[g < mask.size]] = True
    return mask


def _mass_in(summary: TurnSummary, start: int, end: int) -> float:
    """Weight the answer's picks put on context tokens [start, end): an entry's weight is shared by its tokens."""
    total = 0.0
    for layer, (ids, w) in summary.picks.items():
        m = summary.rates[layer]
        lo, hi = np.searchsorted(ids, start // m), np.searchsorted(ids, -(-end // m))
        sub = ids[lo:hi].astype(np.int64) * m
        overlap = np.minimum(end, sub + m) - np.maximum(start, sub)
        total += float((w[lo:hi].astype(np.float64) * np.clip(overlap, 0, None) / m).sum())
    return total


def unread_regions(name: str, start: int, end: int, unread: np.ndarray, first: int, rate: int,
                   layout=None, offset: int = 0) -> list[Region]:
    """Maximal runs of True in `unread` (grid entries first, first+1, ...) clipped to a document's text
    [start, end), longest first; with a layout each is named by its file lines (runs that hold no line
    of the document are left out)."""
    d = np.diff(np.concatenate(([0], unread.astype(np.int8), [0])))
    out = []
    for a, b in zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()):
        t0, t1 = max(start, (first + a) * rate), min(end, (first + b) * rate)
        if t0 >= t1:
            continue
        l0 = l1 = 0
        if layout is not None:
            spans = [s for s in layout.locate(t0 - offset, t1 - offset) if s.name == name and s.line_start > 0]
            if not spans:
                continue
            l0, l1 = min(s.line_start for s in spans), max(s.line_end for s in spans)
        out.append(Region(name, l0, l1, t0, t1))
    return sorted(out, key=lambda r: (-r.tokens, r.token_start))


def coverage(summaries: Sequence[TurnSummary | None], n_context: int, rate: int,
             docs: Sequence[tuple[str, int, int]], layout=None, offset: int = 0) -> Coverage:
    """Which parts of the documents' text the answers so far read: per document, the share of its
    entries picked at least once, the attention mass it received and its never-read regions.
    `summaries` may hold None (answers with no record: they count for nothing)."""
    kept = [s for s in summaries if s is not None]
    masks = [read_mask(s, n_context, rate) for s in kept]
    any_read = np.zeros(n_context // rate, dtype=bool)
    for m in masks:
        any_read |= m
    rows, n_grid = [], any_read.size
    for name, start, end in docs:
        g0, g1 = start // rate, min(-(-end // rate), n_grid)
        entries = max(0, g1 - g0)
        read = int(any_read[g0:g1].sum()) if entries else 0
        mass = sum(_mass_in(s, start, end) for s in kept)
        regions = unread_regions(name, start, end, ~any_read[g0:g1], g0, rate, layout, offset) if entries else []
        rows.append([name, entries, read, mass, regions])
    total = sum(r[3] for r in rows)
    docs_out = [DocCoverage(n, e, r, m, m / total if total > 0 else 0.0, g) for n, e, r, m, g in rows]
    return Coverage(docs_out, len(kept), rate, n_context, masks, any_read)


# ------------------------------------------------------------------------------------ two answers
@dataclass(frozen=True)
class Comparison:
    """Two answers' CSA selections over one context length (the longer of the two)."""
    n_context: int
    rates: dict[int, int]
    a: dict[int, np.ndarray]  # CSA layer -> weight per entry
    b: dict[int, np.ndarray]
    counts: dict[int, tuple[int, int, int]]  # layer -> entries picked by A only, by both, by B only
    jaccard: dict[int, float]  # layer -> |A ∩ B| / |A ∪ B| of the picked entries (nan: neither picked any)
    overall: float  # the same over (layer, entry) pairs
    weighted: float  # sum over (layer, entry) of min(A's share of its weight, B's); nan without weight
    shared: list[tuple[int, int]]  # (i, j): A's source i and B's source j are lines of the same file that meet

    @property
    def layers(self) -> list[int]:
        return sorted(self.a)

    @property
    def diff(self) -> dict[int, np.ndarray]:
        return {layer: self.b[layer] - self.a[layer] for layer in self.layers}


def shared_sources(sources_a: Sequence, sources_b: Sequence) -> list[tuple[int, int]]:
    """Pairs (i, j) where A's source i and B's source j name intersecting lines of one file."""
    return [(i, j) for i, x in enumerate(sources_a) for j, y in enumerate(sources_b)
            if x.file == y.file and x.line_start <= y.line_end and y.line_start <= x.line_end]


def compare(a: TurnSummary, b: TurnSummary, sources_a: Sequence = (), sources_b: Sequence = ()) -> Comparison:
    n = max(a.n_context, b.n_context)
    rates = {**a.rates, **b.rates}
    layers = sorted(rates)
    dense_a = {l: a.dense(l, n) if l in a.picks else np.zeros(n // rates[l]) for l in layers}
    dense_b = {l: b.dense(l, n) if l in b.picks else np.zeros(n // rates[l]) for l in layers}
    counts, jaccard = {}, {}
    inter = union = 0
    for l in layers:
        pa, pb = a.picked(l), b.picked(l)
        both = len(pa & pb)
        counts[l] = (len(pa) - both, both, len(pb) - both)
        u = len(pa | pb)
        jaccard[l] = both / u if u else float("nan")
        inter, union = inter + both, union + u
    wa = np.concatenate([dense_a[l] for l in layers]) if layers else np.zeros(0)
    wb = np.concatenate([dense_b[l] for l in layers]) if layers else np.zeros(0)
    sa, sb = wa.sum(), wb.sum()
    weighted = float(np.minimum(wa / sa, wb / sb).sum()) if sa > 0 and sb > 0 else float("nan")
    return Comparison(n, rates, dense_a, dense_b, counts, jaccard, inter / union if union else float("nan"),
                      weighted, shared_sources(sources_a, sources_b))


__all__ = ["Comparison", "Coverage", "DocCoverage", "Region", "SUMMARY_BYTES", "TurnSummary", "compare",
           "coverage", "read_mask", "shared_sources", "summarize", "text_spans", "unread_regions",
           "within_budget"]
