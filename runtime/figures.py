"""Plotly figures for Longlens: where DeepSeek-V4's sparse attention looked.

Pure module: imports only plotly, numpy and the standard library (no torch, no gradio), so the app, the
command line's HTML reports and the tests share it.  Every public function takes plain
Python/numpy data and returns a ``plotly.graph_objects.Figure``; empty inputs
give a figure carrying an explanatory annotation instead of raising.

Input conventions
-----------------
* ``docs``: iterable of :class:`Doc` or ``(name, token_start, token_end)``
  tuples (end exclusive), sorted and non-overlapping.
* ``selection``: ``{layer: array over CSA entries}``; entry ``w`` covers tokens
  ``[ratio*w, ratio*w + ratio)``.  Values are non-negative counts or weights
  aggregated over the query positions of an answer; 0 means "not selected".
* ``hca``: ``{layer: array of attention weights over 128-token entries}``.
* ``mass``: ``{layer: (window, compressed, sink)}`` fractions of attention mass.

Long contexts are binned (:func:`bin_positions`) so a figure never has more than
``max_columns`` columns, which keeps the JSON small even at 1M tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

__all__ = ["Doc", "bin_positions", "byte_unit", "format_bytes", "selection_heatmap", "mass_split_bar",
           "hca_weights", "compression_boundary", "cache_ledger", "shared_zmax", "difference_heatmap",
           "overlap_bars", "coverage_strip"]

FONT = dict(family="system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", size=13)
COLORS = {"compressed": "#4C78A8", "buffered": "#F58518", "window": "#54A24B", "sink": "#9D9D9D",
          "a": "#4C78A8", "b": "#E45756", "both": "#8E6BB0", "unread": "#F6D7B8"}
LABEL_DOCS_MAX = 12    # up to this many docs: boundary lines with names
BAND_DOCS_MAX = 2000   # beyond this many docs: no bands (hover still names them)


@dataclass(frozen=True)
class Doc:
    """A document's token span ``[token_start, token_end)`` in the context."""
    name: str
    token_start: int
    token_end: int


def _docs(docs: Iterable | None, n_tokens: int) -> list[Doc]:
    out = [d if isinstance(d, Doc) else Doc(*d) for d in (docs or ())]
    out = [Doc(d.name, max(0, int(d.token_start)), min(n_tokens, int(d.token_end))) for d in out]
    return sorted((d for d in out if d.token_end > d.token_start), key=lambda d: d.token_start)


BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def byte_unit(n: float) -> tuple[str, int]:
    """The binary unit that shows byte counts up to ``n`` as numbers under 1024, and its size:
    ``byte_unit(3 << 20) == ('MiB', 1 << 20)``."""
    for i, unit in enumerate(BYTE_UNITS):
        if abs(n) < 1024 ** (i + 1) or unit == BYTE_UNITS[-1]:
            return unit, 1024 ** i
    raise AssertionError("unreachable")


def format_bytes(n: float) -> str:
    """Binary-unit byte count: ``format_bytes(1536) == '1.5 KiB'``."""
    unit, size = byte_unit(n)
    return f"{n:.0f} B" if unit == "B" else f"{n / size:.1f} {unit}"


def bin_positions(values_per_entry, entry_tokens: int, n_tokens: int, max_columns: int,
                  how: str = "sum") -> tuple[np.ndarray, np.ndarray]:
    """Bin per-entry values into at most ``max_columns`` columns over the context.

    Entry ``i`` covers tokens ``[i*entry_tokens, (i+1)*entry_tokens)``.  Each bin
    holds a whole number ``k`` of entries (``k = ceil(n_entries / max_columns)``),
    so no entry straddles two bins and the result is exact.  Returns
    ``(edges, binned)``: ``edges`` are token offsets (int64, length
    ``n_bins + 1``, last clipped to ``n_tokens``); ``binned[j]`` is the sum or
    max of the entries in bin ``j``.  Missing trailing entries count as 0;
    non-zero entries beyond the context raise ``ValueError``.
    """
    if how not in ("sum", "max"):
        raise ValueError(f"how must be 'sum' or 'max', not {how!r}")
    if entry_tokens < 1 or max_columns < 1 or n_tokens < 0:
        raise ValueError("entry_tokens and max_columns must be >= 1, n_tokens >= 0")
    v = np.asarray(values_per_entry, dtype=np.float64).ravel()
    n_entries = -(-n_tokens // entry_tokens)
    if v.size > n_entries:
        if np.any(v[n_entries:] != 0):
            raise ValueError(f"non-zero values beyond the {n_tokens}-token context")
        v = v[:n_entries]
    k = max(1, -(-n_entries // max_columns))
    n_bins = -(-n_entries // k)
    fill = 0.0 if how == "sum" else -np.inf
    padded = np.full(n_bins * k, fill)
    padded[:v.size] = v
    if how == "max":  # entries not given count as 0, padding beyond the context does not
        padded[v.size:n_entries] = 0.0
    blocks = padded.reshape(n_bins, k)
    binned = blocks.sum(axis=1) if how == "sum" else blocks.max(axis=1)
    edges = np.minimum(np.arange(n_bins + 1, dtype=np.int64) * k * entry_tokens, n_tokens)
    return edges, binned


def _style(fig: go.Figure, title: str, height: int = 360) -> go.Figure:
    fig.update_layout(template="plotly_white", font=FONT, height=height, title=dict(text=title, x=0.01),
                      margin=dict(l=70, r=30, t=70, b=50), hoverlabel=dict(font=FONT))
    return fig


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=15, color="#666"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _style(fig, title, height=240)


def _add_docs(fig: go.Figure, docs: list[Doc]) -> None:
    """Few docs: named boundary lines.  Many: alternating background bands."""
    if len(docs) <= LABEL_DOCS_MAX:
        for d in docs:
            fig.add_shape(type="line", x0=d.token_start, x1=d.token_start, y0=0, y1=1, xref="x",
                          yref="paper", line=dict(color="#444", width=1, dash="dot"))
            name = d.name if len(d.name) <= 24 else d.name[:23] + "…"
            fig.add_annotation(text=name, x=(d.token_start + d.token_end) / 2, y=1, xref="x",
                               yref="paper", yanchor="bottom", showarrow=False, font=dict(size=11))
    elif len(docs) <= BAND_DOCS_MAX:
        for d in docs[1::2]:
            fig.add_shape(type="rect", x0=d.token_start, x1=d.token_end, y0=0, y1=1, xref="x",
                          yref="paper", fillcolor="rgba(0,0,0,0.06)", line_width=0, layer="below")
    else:
        fig.add_annotation(text=f"{len(docs):,} documents (too many to band; hover names them)",
                           x=1, y=1, xref="paper", yref="paper", xanchor="right", yanchor="bottom",
                           showarrow=False, font=dict(size=11, color="#666"))


def _doc_namer(docs: list[Doc]) -> Callable[[int, int], str]:
    """Returns f(a, b): names of the docs overlapping tokens [a, b), e.g. 'a.py (+3 more)'."""
    ends = np.array([d.token_end for d in docs], np.int64)
    starts = np.array([d.token_start for d in docs], np.int64)

    def names(a: int, b: int) -> str:
        i0, i1 = int(np.searchsorted(ends, a, "right")), int(np.searchsorted(starts, b, "left"))
        if i1 <= i0:
            return ""
        return docs[i0].name + (f" (+{i1 - i0 - 1} more)" if i1 - i0 > 1 else "")
    return names


def _binned(selection: Mapping[int, np.ndarray], layers: Sequence[int], ratio: int, n_tokens: int,
            max_columns: int, how: str = "sum") -> tuple[np.ndarray, np.ndarray]:
    """(edges, [layers, columns] binned values); a layer missing from ``selection`` is all zeros."""
    edges, rows = None, []
    for l in layers:
        e, v = bin_positions(selection.get(l, ()), ratio, n_tokens, max_columns, how)
        edges = e
        rows.append(v)
    return edges, np.vstack(rows)


def _column_text(edges: np.ndarray, columns: Iterable[int], where_fn: Callable[[int, int], str]) -> dict[int, str]:
    """Hover text of the given columns: their token range and where it lies."""
    out = {}
    for j in columns:
        a, b = int(edges[j]), int(edges[j + 1])
        where = where_fn(a, b)
        out[int(j)] = f"tokens {a:,}–{b - 1:,}" + (f"<br>{where}" if where else "")
    return out


def shared_zmax(selections: Sequence[Mapping[int, np.ndarray]], n_tokens: int, ratio: int = 4,
                max_columns: int = 2000, how: str = "sum") -> float:
    """The largest cell over several selections binned as :func:`selection_heatmap` bins them: pass it
    as ``zmax`` to draw them on one colour scale (0 when nothing is selected)."""
    top = 0.0
    for sel in selections:
        for l in sel:
            top = max(top, float(bin_positions(sel[l], ratio, n_tokens, max_columns, how)[1].max(initial=0.0)))
    return top


def selection_heatmap(selection: Mapping[int, np.ndarray], n_tokens: int, docs=(), ratio: int = 4,
                      max_columns: int = 2000, locate: Callable[[int, int], str] | None = None,
                      how: str = "sum", value_label: str = "selections", zmax: float | None = None,
                      title: str | None = None, empty: str | None = None) -> go.Figure:
    """CSA layers (rows) x context position (binned columns) of selected entries.

    Hover text is computed only for non-zero cells (zero cells are blank and
    hover-less): the token range plus ``locate(tok_start, tok_end)`` (e.g.
    ``"notes.md:12-30"``) if given, else the names of the documents covered.
    ``zmax``: the top of the colour scale (from 0), e.g. :func:`shared_zmax` of
    figures to compare; by default each figure scales to its own cells.
    ``empty``: the message when there is nothing to show.
    """
    title = title or "CSA selection: which compressed blocks the indexer picked"
    if not selection or n_tokens <= 0:
        return _empty(title, empty or "No CSA selection recorded yet: ask a question to see where the model looked.")
    layers = sorted(selection)
    edges, z = _binned(selection, layers, ratio, n_tokens, max_columns, how)
    z[z == 0] = np.nan
    docs = _docs(docs, n_tokens)
    col_text = _column_text(edges, np.flatnonzero(~np.isnan(z).all(axis=0)), locate or _doc_namer(docs))
    text = [[col_text[j] if not np.isnan(z[i, j]) else "" for j in range(z.shape[1])]
            for i in range(z.shape[0])]
    bin_tokens = int(edges[1] - edges[0])
    scale = dict(zmin=0.0, zmax=float(zmax)) if zmax else {}
    fig = go.Figure(go.Heatmap(
        z=z.astype(np.float32), x=edges, y=[f"L{l}" for l in layers], text=text, hoverongaps=False,
        colorscale="Blues", colorbar=dict(title=dict(text=f"{value_label}<br>({how} per {bin_tokens:,} tokens)")),
        hovertemplate="%{y}<br>%{text}<br>" + how + ": %{z:.3g}<extra></extra>", **scale))
    _add_docs(fig, docs)
    fig.update_xaxes(title="context position (tokens)", range=[0, n_tokens])
    fig.update_yaxes(autorange="reversed", title="CSA layer")
    return _style(fig, title, height=max(260, 140 + 28 * len(layers)))


def difference_heatmap(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray], n_tokens: int, docs=(),
                       ratio: int = 4, max_columns: int = 2000, locate: Callable[[int, int], str] | None = None,
                       labels: tuple[str, str] = ("A", "B"), value_label: str = "attention weight") -> go.Figure:
    """``b - a`` per CSA layer and binned column, on a diverging scale centred on 0 (red: ``b`` put
    more there, blue: ``a`` did). Cells neither selected are blank; hover gives both values."""
    title = f"Difference: {labels[1]} − {labels[0]}"
    if not (a or b) or n_tokens <= 0:
        return _empty(title, "Nothing to compare yet.")
    layers = sorted(set(a) | set(b))
    edges, za = _binned(a, layers, ratio, n_tokens, max_columns)
    _, zb = _binned(b, layers, ratio, n_tokens, max_columns)
    z = zb - za
    z[(za == 0) & (zb == 0)] = np.nan
    top = float(np.nanmax(np.abs(z))) if np.any(~np.isnan(z)) else 0.0
    top = top or 1.0
    docs = _docs(docs, n_tokens)
    col_text = _column_text(edges, np.flatnonzero(~np.isnan(z).all(axis=0)), locate or _doc_namer(docs))
    text = [[col_text[j] if not np.isnan(z[i, j]) else "" for j in range(z.shape[1])] for i in range(z.shape[0])]
    bin_tokens = int(edges[1] - edges[0])
    fig = go.Figure(go.Heatmap(
        z=z.astype(np.float32), x=edges, y=[f"L{l}" for l in layers], text=text, hoverongaps=False,
        customdata=np.stack([za, zb], axis=-1).astype(np.float32), colorscale="RdBu_r", zmid=0.0,
        zmin=-top, zmax=top,
        colorbar=dict(title=dict(
            text=f"{value_label}<br>{labels[1]} − {labels[0]}<br>(sum per {bin_tokens:,} tokens)")),
        hovertemplate=("%{y}<br>%{text}<br>" + f"{labels[0]}: " + "%{customdata[0]:.3g} · " + f"{labels[1]}: "
                       + "%{customdata[1]:.3g}<br>difference: %{z:.3g}<extra></extra>")))
    _add_docs(fig, docs)
    fig.update_xaxes(title="context position (tokens)", range=[0, n_tokens])
    fig.update_yaxes(autorange="reversed", title="CSA layer")
    return _style(fig, title, height=max(260, 140 + 28 * len(layers)))


def overlap_bars(counts: Mapping[int, Sequence[int]], labels: tuple[str, str] = ("A", "B"),
                 jaccard: Mapping[int, float] | None = None) -> go.Figure:
    """Per CSA layer, the entries picked by ``a`` only, by both and by ``b`` only (``counts[layer] =
    (only_a, both, only_b)``), stacked; ``jaccard`` (both / either) is written at each bar's end."""
    title = "Overlap of the picked CSA entries"
    if not counts:
        return _empty(title, "Nothing to compare yet.")
    layers = sorted(counts)
    vals = np.array([[int(x) for x in counts[l]] for l in layers])
    if vals.ndim != 2 or vals.shape[1] != 3:
        raise ValueError("counts values must be (only a, both, only b) triples")
    y = [f"L{l}" for l in layers]
    fig = go.Figure()
    for k, (name, color) in enumerate([(f"{labels[0]} only", COLORS["a"]), ("both", COLORS["both"]),
                                       (f"{labels[1]} only", COLORS["b"])]):
        fig.add_trace(go.Bar(x=vals[:, k], y=y, orientation="h", name=name, marker_color=color,
                             hovertemplate="%{y} " + name + ": %{x:,} entries<extra></extra>"))
    if jaccard:
        totals = vals.sum(axis=1)
        for l, yl, t in zip(layers, y, totals):
            j = jaccard.get(l, float("nan"))
            fig.add_annotation(x=t, y=yl, text="Jaccard " + ("–" if np.isnan(j) else f"{j:.2f}"), xanchor="left",
                               showarrow=False, xshift=6, font=dict(size=11))
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=-0.15, yanchor="top", x=0, traceorder="normal"))
    fig.update_xaxes(rangemode="tozero")
    fig.update_yaxes(autorange="reversed")
    fig = _style(fig, title + " (entries per layer)", height=max(240, 170 + 30 * len(layers)))
    fig.update_layout(margin=dict(r=110, b=80))
    return fig


def coverage_strip(rows: Sequence[tuple[str, np.ndarray]], n_tokens: int, docs=(), ratio: int = 4,
                   max_columns: int = 2000, locate: Callable[[int, int], str] | None = None) -> go.Figure:
    """Share of the entries read, per binned column of the context, one row per ``(label, read)``
    (``read``: bool per closed ``ratio``-token entry). 0 (never read) stands out in its own colour."""
    title = "Coverage: which parts of the context the answers read"
    if not rows or n_tokens <= 0:
        return _empty(title, "No answers yet: ask questions to see which parts of the corpus they read.")
    n_entries = n_tokens // ratio
    edges, have = bin_positions(np.ones(n_entries), ratio, n_tokens, max_columns)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.vstack([bin_positions(np.asarray(r, dtype=np.float64)[:n_entries], ratio, n_tokens,
                                     max_columns)[1] / have for _, r in rows])
    z[:, have == 0] = np.nan  # columns of the open (not yet pooled) tokens only
    docs = _docs(docs, n_tokens)
    col_text = _column_text(edges, range(z.shape[1]), locate or _doc_namer(docs))
    text = [[col_text[j] for j in range(z.shape[1])] for _ in rows]
    bin_tokens = int(edges[1] - edges[0]) if edges.size > 1 else ratio
    scale = [[0.0, COLORS["unread"]], [1e-6, "#DCE7F3"], [1.0, "#2F5D8A"]]
    fig = go.Figure(go.Heatmap(
        z=z.astype(np.float32), x=edges, y=[label for label, _ in rows], text=text, hoverongaps=False,
        colorscale=scale, zmin=0.0, zmax=1.0, xgap=0, ygap=2,
        colorbar=dict(title=dict(text=f"entries read<br>(share per {bin_tokens:,} tokens)"), tickformat=".0%"),
        hovertemplate="%{y}<br>%{text}<br>read: %{z:.0%}<extra></extra>"))
    _add_docs(fig, docs)
    fig.update_xaxes(title="context position (tokens)", range=[0, n_tokens])
    fig.update_yaxes(autorange="reversed")
    return _style(fig, title, height=max(220, 150 + 26 * len(rows)))


def mass_split_bar(mass: Mapping[int, Sequence[float]]) -> go.Figure:
    """Stacked horizontal bars per layer: attention mass on window / compressed / sink."""
    title = "Where the attention mass went, per layer"
    if not mass:
        return _empty(title, "No attention mass recorded yet.")
    layers = sorted(mass)
    vals = np.array([[float(x) for x in mass[l]] for l in layers])
    if vals.ndim != 2 or vals.shape[1] != 3:
        raise ValueError("mass values must be (window, compressed, sink) triples")
    labels = [f"L{l}" for l in layers]
    fig = go.Figure()
    for i, (name, key) in enumerate([("sliding window", "window"), ("compressed entries", "compressed"),
                                     ("sink", "sink")]):
        fig.add_trace(go.Bar(x=vals[:, i], y=labels, orientation="h", name=name,
                             marker_color=COLORS[key], hovertemplate="%{y} " + name + ": %{x:.1%}<extra></extra>"))
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=-0.2, yanchor="top", x=0))
    fig.update_xaxes(tickformat=".0%", range=[0, max(1.0, float(vals.sum(axis=1).max()))])
    fig.update_yaxes(autorange="reversed")
    fig = _style(fig, title, height=max(260, 170 + 22 * len(layers)))
    fig.update_layout(margin=dict(b=80))
    return fig


def hca_weights(hca: Mapping[int, np.ndarray], n_tokens: int, docs=(), max_columns: int = 2000,
                rate: int = 128) -> go.Figure:
    """Step line per HCA layer of attention weight over ``rate``-token entries (summed per bin)."""
    title = f"HCA: attention weight over {rate}-token summaries"
    if not hca or n_tokens <= 0:
        return _empty(title, "No HCA weights recorded yet.")
    fig = go.Figure()
    for l in sorted(hca):
        edges, vals = bin_positions(hca[l], rate, n_tokens, max_columns, "sum")
        fig.add_trace(go.Scatter(
            x=edges, y=np.append(vals, vals[-1]), customdata=np.append(edges[1:], n_tokens) - 1,
            mode="lines", line_shape="hv", name=f"L{l}",
            hovertemplate=f"L{l}" + "<br>tokens %{x:,}–%{customdata:,}<br>weight %{y:.3g}<extra></extra>"))
    _add_docs(fig, _docs(docs, n_tokens))
    bin_tokens = int(edges[1] - edges[0]) if edges.size > 1 else rate
    fig.update_xaxes(title="context position (tokens)", range=[0, n_tokens])
    fig.update_yaxes(title=f"weight (sum per {bin_tokens:,} tokens)", rangemode="tozero")
    return _style(fig, title)


def _rate_name(rate: int) -> str:
    return {4: "CSA 4:1", 128: "HCA 128:1"}.get(rate, f"{rate}:1")


def compression_boundary(n_tokens: int, window: int = 128, ratios: Mapping[int, int] | None = None,
                         span: int = 512) -> go.Figure:
    """The last ``span`` tokens: what is pooled into closed entries, what is still buffered.

    ``ratios`` maps layer -> compression rate (0 or 1: sliding window only).
    Layers sharing a rate share a row.  An entry of rate ``m`` becomes visible
    once its ``m`` tokens are all in context; the ``n % m`` trailing tokens
    wait in the compressor buffer and reach queries only via the sliding window.
    """
    title = "Compression boundary: what the next token can see"
    if n_tokens <= 0 or not ratios:
        return _empty(title, "No context yet, or no compression ratios given.")
    v0 = max(0, n_tokens - span)
    by_rate: dict[int, list[int]] = {}
    for layer, rate in ratios.items():
        if rate and rate > 1:
            by_rate.setdefault(int(rate), []).append(layer)
    seg = {k: dict(y=[], base=[], x=[], hovertext=[]) for k in ("compressed", "buffered", "window")}

    def put(kind, row, a, b, hover):
        if b > a:
            s = seg[kind]
            s["y"].append(row); s["base"].append(a); s["x"].append(b - a); s["hovertext"].append(hover)

    win_row = f"sliding window ({window})"
    row_order = [win_row]
    put("window", win_row, max(v0, n_tokens - window), n_tokens,
        f"in sliding window: tokens {max(0, n_tokens - window):,}–{n_tokens - 1:,}")
    for rate in sorted(by_rate):
        ls = sorted(by_rate[rate])
        row = f"{_rate_name(rate)} ({len(ls)} layer{'s' if len(ls) > 1 else ''})"
        row_order.append(row)
        closed = n_tokens // rate
        for w in range(v0 // rate, closed):
            put("compressed", row, max(v0, w * rate), w * rate + rate,
                f"{_rate_name(rate)} entry {w:,}: tokens {w * rate:,}–{w * rate + rate - 1:,} (closed, visible)")
        put("buffered", row, max(v0, closed * rate), n_tokens,
            f"{n_tokens - closed * rate} token(s) buffered, not yet pooled (entry {closed:,} closes at token "
            f"{closed * rate + rate - 1:,}); visible only via the sliding window")
    fig = go.Figure()
    names = {"compressed": "compressed (closed entry)", "buffered": "buffered (not yet pooled)",
             "window": "in sliding window"}
    for kind, s in seg.items():
        if s["y"]:
            fig.add_trace(go.Bar(orientation="h", name=names[kind], marker=dict(color=COLORS[kind],
                                 line=dict(color="white", width=0.5)), hoverinfo="text", **s))
    fig.add_shape(type="line", x0=n_tokens, x1=n_tokens, y0=0, y1=1, xref="x", yref="paper",
                  line=dict(color="#C44", dash="dash"))
    fig.add_annotation(text=f"context end ({n_tokens:,})", x=n_tokens, y=1, xref="x", yref="paper",
                       xanchor="right", yanchor="bottom", showarrow=False, font=dict(size=11))
    fig.update_layout(barmode="overlay", bargap=0.35, legend=dict(orientation="h", y=-0.3, yanchor="top", x=0))
    fig.update_xaxes(range=[v0, n_tokens + max(1, (n_tokens - v0) // 50)], title="token position")
    fig.update_yaxes(autorange="reversed", categoryorder="array", categoryarray=row_order)
    fig = _style(fig, title, height=200 + 45 * (1 + len(by_rate)))
    fig.update_layout(margin=dict(b=95))
    return fig


def cache_ledger(nbytes: Mapping[str, int], dense_bytes: int) -> go.Figure:
    """Cache bytes per component (stacked) next to the dense-equivalent KV cache. The axis is in
    one binary unit (KiB, MiB, GiB...) chosen from the longer bar; hovers give the exact bytes."""
    title = "KV cache ledger"
    if not nbytes and dense_bytes <= 0:
        return _empty(title, "No cache allocated yet.")
    if any(v < 0 for v in nbytes.values()) or dense_bytes < 0:
        raise ValueError("byte counts must be non-negative")
    total = sum(nbytes.values())
    unit, size = byte_unit(max(total, dense_bytes))
    fig = go.Figure()
    palette = ["#4C78A8", "#F58518", "#54A24B", "#B279A2", "#E45756", "#72B7B2", "#EECA3B", "#FF9DA6"]
    for i, (name, b) in enumerate(nbytes.items()):
        fig.add_trace(go.Bar(x=[b / size], y=["this cache"], orientation="h", name=name,
                             marker_color=palette[i % len(palette)], text=[format_bytes(b)],
                             hovertemplate=f"{name}: {format_bytes(b)} ({b:,} B)<extra></extra>"))
    fig.add_trace(go.Bar(x=[dense_bytes / size], y=["dense equivalent"], orientation="h", name="dense equivalent",
                         marker_color=COLORS["sink"], text=[format_bytes(dense_bytes)],
                         hovertemplate=f"dense: {format_bytes(dense_bytes)} ({dense_bytes:,} B)<extra></extra>"))
    note = f"total {format_bytes(total)}"
    if dense_bytes > 0:
        note += f" = {total / dense_bytes:.1%} of dense"
        if total > 0:
            note += f" ({dense_bytes / total:.1f}× smaller)"
    fig.add_annotation(text=note, x=1, y=1.02, xref="paper", yref="paper", xanchor="right",
                       yanchor="bottom", showarrow=False)
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=-0.25))
    fig.update_traces(textposition="inside", insidetextanchor="middle")
    # plotly's own tick format would print SI prefixes ("0.5B" for half a billion bytes)
    fig.update_xaxes(title=f"cache size ({unit})", ticksuffix=f" {unit}", exponentformat="none", rangemode="tozero")
    return _style(fig, title, height=300)
