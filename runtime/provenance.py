"""Provenance: which corpus lines an answer's sparse attention read, traced from a `runtime.Capture`.

Answer token k was produced by the query at context position `query_positions[k]` (the prompt's last
token for k = 0, then each fed answer token). For that query the capture holds, per layer,
- CSA: the entry ids the lightning indexer selected and the head-averaged attention probability
  each pick received;
- HCA: the head-averaged probability of every visible 128-token entry (dense);
- every layer: the mass split window / compressed / sink.
Entry w of a layer with rate m covers context tokens [w*m, (w+1)*m) (a CSA entry also pools the
previous window's first half; it is attributed to its own window, as in runtime/introspect.py).

Context positions become layout positions by subtracting `offset` (the chat preamble before the
corpus, see runtime/engine.py), then `Layout.locate` gives file and lines. Ranking: the weight of
an entry is the attention probability it received, summed over layers (and over the answer's
tokens for the whole-answer sources). The heaviest entries are cut to their documents' text,
merged when they touch in tokens or in lines of the same file, and reported as `Source`s whose
`weight` is their share of all compressed-entry attention that landed in the corpus. Attention on
"### File:" headers, the preamble and the conversation itself is not a source.

Pure apart from torch tensors in the capture; numpy arrays out (for runtime/figures.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .config import ModelConfig
from .corpus import Layout
from .introspect import Capture

CANDIDATES_PER_SOURCE = 8  # heaviest entries examined per source asked for
TOKEN_HCA_TOP = 32  # HCA entries kept per answer token (the dense sum over the answer is in `hca`)


@dataclass(frozen=True)
class Source:
    file: str
    line_start: int  # 1-based, inclusive
    line_end: int
    weight: float  # share of the corpus-bound compressed attention
    layers: tuple[int, ...]
    snippet: str
    token_start: int  # context positions [token_start, token_end) of the merged text tokens
    token_end: int

    def to_dict(self) -> dict:
        """The CLI / JSON form: file, line_start, line_end, weight, layers, snippet."""
        return {"file": self.file, "line_start": self.line_start, "line_end": self.line_end,
                "weight": round(self.weight, 6), "layers": list(self.layers), "snippet": self.snippet}


@dataclass
class TokenProvenance:
    index: int  # answer token index
    position: int  # context position of the query that produced it
    token_id: int
    text: str  # its decoded piece ('' while a multi-byte character is incomplete)
    entries: dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (entry ids [K], weights [K]), heaviest first
    sources: list[Source]


@dataclass
class Provenance:
    n_context: int  # context length the entry arrays refer to
    offset: int  # context position of layout token 0
    rates: dict[int, int]  # layer -> compression rate (CSA and HCA layers)
    csa: dict[int, np.ndarray]  # layer -> [n_context // rate] attention weight per entry, summed over the answer
    csa_counts: dict[int, np.ndarray]  # layer -> [n_context // rate] times the indexer picked each entry
    hca: dict[int, np.ndarray]  # layer -> [n_context // rate] attention weight per entry, summed over the answer
    mass: dict[int, tuple[float, float, float]]  # layer -> mean (window, compressed, sink) share over the answer
    sources: list[Source]  # whole answer, heaviest first
    tokens: list[TokenProvenance]
    docs: list[tuple[str, int, int]]  # (name, start, end) in context positions, for figures
    layout: Layout | None = field(default=None, repr=False)

    def describe(self, tok_start: int, tok_end: int) -> str:
        """'a.py:3-9; b.md:1-2' for context tokens [tok_start, tok_end) (hover text of figures)."""
        if self.layout is None:
            return ""
        spans = self.layout.locate(tok_start - self.offset, tok_end - self.offset)
        return "; ".join(f"{s.name}:{s.line_start}-{s.line_end}" if s.line_start else f"{s.name} (header)"
                         for s in spans)

    def selection(self, tokens: Sequence[int] | None = None, counts: bool = False) -> tuple[dict, dict]:
        """({CSA layer: value per entry}, {HCA layer: weight per entry}) summed over the answer tokens
        `tokens` (indices; None: the whole answer). `counts`: times the indexer picked each CSA entry
        instead of its attention weight."""
        if tokens is None:
            return dict(self.csa_counts if counts else self.csa), dict(self.hca)
        csa, hca = {}, {}
        for k in tokens:
            for layer, (ids, w) in self.tokens[k].entries.items():
                n, is_csa = self.n_context // self.rates[layer], layer in self.csa
                arr = (csa if is_csa else hca).setdefault(layer, np.zeros(n))
                ids, w = np.asarray(ids), np.asarray(w, dtype=np.float64)
                ok = (ids >= 0) & (ids < n)
                np.add.at(arr, ids[ok], 1.0 if (counts and is_csa) else w[ok])
        return csa, hca

    def to_dict(self, top: int | None = None) -> dict:
        """JSON-friendly summary: sources, per-token sources and the mass split (no entry arrays)."""
        return {"sources": [s.to_dict() for s in self.sources[:top]],
                "tokens": [{"index": t.index, "text": t.text, "sources": [s.to_dict() for s in t.sources]}
                           for t in self.tokens],
                "mass": {str(l): list(m) for l, m in self.mass.items()}}


def compute_provenance(capture: Capture, config: ModelConfig, layout: Layout | None, offset: int,
                       query_positions: Sequence[int], n_context: int, answer_ids: Sequence[int] = (),
                       answer_pieces: Sequence[str] = (), top: int = 8, token_top: int = 3) -> Provenance:
    """Provenance of the answer whose k-th token came from the query at `query_positions[k]`."""
    rates = {l: config.rate(l) for l in range(config.num_hidden_layers) if config.rate(l)}
    rows_of: dict[int, np.ndarray] = {}
    csa, counts, hca, mass = {}, {}, {}, {}
    per_token: list[list[tuple[int, int, np.ndarray, np.ndarray, float]]] = [[] for _ in query_positions]
    lo, hi = offset, offset + (len(layout.ids) if layout is not None else 0)  # corpus tokens in context
    for layer in capture.layers:
        rec = capture.record(layer)
        rows = _rows(rec.positions, query_positions, layer)
        rows_of[layer] = rows
        if len(rows):
            mass[layer] = tuple(float(x) for x in rec.mass[0, rows].mean(0))
        m = rates.get(layer)
        if not m or rec.weights is None:
            continue
        n_entries = n_context // m
        w = rec.weights[0, rows].double().numpy()  # [T, K] (CSA picks) or [T, N] (HCA entries)
        if rec.selected is not None:  # CSA: sparse picks, -1 = none
            sel = rec.selected[0, rows].numpy()
            ok = sel >= 0
            csa[layer] = np.bincount(sel[ok], weights=w[ok], minlength=n_entries)[:n_entries]
            counts[layer] = np.bincount(sel[ok], minlength=n_entries)[:n_entries].astype(np.int64)
            for k in range(len(rows)):
                ids, wk = sel[k][ok[k]], w[k][ok[k]]
                order = np.argsort(-wk, kind="stable")
                per_token[k].append((layer, m, ids[order], wk[order], _corpus_weight(ids, wk, m, lo, hi)))
        else:  # HCA: dense weights over entries (zero-padded past each query's visible ones)
            w = w[:, :n_entries]
            hca[layer] = np.pad(w.sum(0), (0, n_entries - w.shape[1]))
            for k in range(len(rows)):
                ids = np.arange(w.shape[1])
                order = np.argsort(-w[k], kind="stable")[:TOKEN_HCA_TOP]
                per_token[k].append((layer, m, ids[order], w[k][order], _corpus_weight(ids, w[k], m, lo, hi)))

    whole = []
    for table in (csa, hca):
        for layer, arr in table.items():
            ids = np.arange(len(arr))
            whole.append((layer, rates[layer], ids, arr, _corpus_weight(ids, arr, rates[layer], lo, hi)))
    sources = rank_sources(whole, layout, offset, top)
    tokens = []
    for k, cands in enumerate(per_token):
        tokens.append(TokenProvenance(
            k, int(query_positions[k]), int(answer_ids[k]) if k < len(answer_ids) else -1,
            answer_pieces[k] if k < len(answer_pieces) else "",
            {layer: (ids, w) for layer, _, ids, w, _ in cands}, rank_sources(cands, layout, offset, token_top)))
    docs = [] if layout is None else [(d.name, d.token_start + offset, d.token_end + offset) for d in layout.documents]
    return Provenance(n_context, offset, rates, csa, counts, hca, mass, sources, tokens, docs, layout)


def _rows(positions, query_positions: Sequence[int], layer: int) -> np.ndarray:
    """Capture rows of the query positions, in answer order."""
    where = {int(p): i for i, p in enumerate(positions.tolist())}
    missing = [p for p in query_positions if int(p) not in where]
    if missing:
        raise ValueError(f"layer {layer}: the capture has no record of query position(s) {missing[:5]}")
    return np.asarray([where[int(p)] for p in query_positions], dtype=np.int64)


def _corpus_weight(ids: np.ndarray, w: np.ndarray, rate: int, lo: int, hi: int) -> float:
    """Weight on entries whose tokens [id*rate, id*rate+rate) intersect the corpus [lo, hi)."""
    inside = (ids * rate < hi) & (ids * rate + rate > lo)
    return float(w[inside].sum())


def rank_sources(cands: list[tuple[int, int, np.ndarray, np.ndarray, float]], layout: Layout | None,
                 offset: int, top: int) -> list[Source]:
    """Top `top` merged sources from per-layer (layer, rate, entry ids, weights, corpus weight) lists."""
    if layout is None or top <= 0 or not layout.documents:
        return []
    total = sum(c[4] for c in cands)
    if total <= 0:
        return []
    lo, hi = offset, offset + len(layout.ids)
    # 1. the heaviest corpus entries of each layer, pooled by token interval across layers
    pooled: dict[tuple[int, int], list] = {}
    keep = top * CANDIDATES_PER_SOURCE
    for layer, m, ids, w, _ in cands:
        inside = (w > 0) & (ids * m < hi) & (ids * m + m > lo)
        ids, w = ids[inside], w[inside]
        if len(w) > keep:
            part = np.argpartition(-w, keep - 1)[:keep]
            ids, w = ids[part], w[part]
        for e, x in zip(ids.tolist(), w.tolist()):
            acc = pooled.setdefault((e * m, e * m + m), [0.0, set()])
            acc[0] += x
            acc[1].add(layer)
    heaviest = sorted(pooled.items(), key=lambda kv: -kv[1][0])[:keep]
    # 2. cut each interval to the document text it covers (layout positions), weight shared by tokens
    pieces: dict[int, list[list]] = {}  # doc index -> [start, end, weight, layers]
    for (a, b), (x, layers) in heaviest:
        a, b = a - offset, b - offset
        i = layout.doc_at(max(a, 0))
        while i < len(layout.documents) and layout.documents[i].token_start < b:
            d = layout.documents[i]
            s, e = max(a, d.text_start), min(b, d.text_end)
            if s < e:
                pieces.setdefault(i, []).append([s, e, x * (e - s) / (b - a), set(layers)])
            i += 1
    # 3. merge touching pieces (in tokens, then in lines) within each document
    sources = []
    for i, ps in pieces.items():
        ps.sort(key=lambda p: p[0])
        merged = [ps[0]]
        for p in ps[1:]:
            cur = merged[-1]
            if p[0] <= cur[1] or layout.lines[p[0]] <= layout.lines[cur[1] - 1] + 1:
                cur[1], cur[2] = max(cur[1], p[1]), cur[2] + p[2]
                cur[3] |= p[3]
            else:
                merged.append(p)
        for s, e, x, layers in merged:
            span = layout.locate(s, e)[0]
            sources.append(Source(span.name, span.line_start, span.line_end, x / total, tuple(sorted(layers)),
                                  span.snippet, s + offset, e + offset))
    sources.sort(key=lambda s: (-s.weight, s.file, s.line_start))
    return sources[:top]


__all__ = ["Provenance", "Source", "TokenProvenance", "compute_provenance", "rank_sources"]
