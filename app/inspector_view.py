"""The attention inspector's view-model: what it shows, computed from plain data.

Inputs are what the runtime hands the app, read by attribute only (nothing here imports it):
- a provenance (runtime Provenance): `n_context`, `rates` {layer: compression rate}, `csa` and
  `csa_counts` {CSA layer: weight / times picked per entry, whole answer}, `hca` {HCA layer: weight
  per entry}, `mass` {layer: (window, compressed, sink)}, `docs` [(name, start, end)] in context
  positions, and `tokens`, each with `index`, `text` and `entries` {layer: (entry ids, weights)};
- a layout (runtime Layout): `documents` (each `name`, `text_start`, `text_end` in layout
  positions), `texts` (each document's text) and `locate(a, b)` -> spans (`name`, `line_start`,
  `line_end`; line 0: a "### File:" header), with `offset`, the context position of layout token 0;
- each turn's sources (runtime Source: `file`, `line_start`, `line_end`, `weight`, `layers`).

Entry w of a layer with rate m covers context tokens [w*m, (w+1)*m). Here: the selection shown per
layer (whole answer or one answer token; weights or counts), the heatmap cell -> context position
-> file:line mapping, the source viewer's window and per-line heat, the viewer targets the page's
clicks send ('src:<turn>:<i>', 'cell:<layer>:<column>', 'pos:<position>', 'file:<name>:<line>[-<line>]'),
and the four figures (through runtime/figures.py, pure plotly). The focus is the whole answer (None),
one answer token (k) or a span of them ((first, last), both included): the selection is summed over it.

Across answers (app/analysis.py): each turn's compact selection record (`summaries`, None where an
answer has none) gives the conversation's coverage of the corpus and the comparison of two answers,
with their figures.

Pure: numpy, plotly (via runtime.figures, which imports no torch) and the standard library; no gradio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import Any, Sequence, Union

import numpy as np

from runtime import figures as F
from . import analysis as A
from .errors import InputError

WHOLE = "all"  # the focus value for the whole answer
Focus = Union[int, tuple[int, int], None]  # one answer token, a span (first, last), or None: the whole answer
HEAT_COLUMNS = 2000  # the heatmap's column cap (figures.selection_heatmap's max_columns)
STRIP_COLUMNS = 600  # the coverage strip's (every cell has hover text: one row per answer)
VIEW_LINES = 160  # most lines the source viewer shows around its target
MEASURES = ("attention weight", "times picked")


# ------------------------------------------------------------------------------------ plain records
@dataclass(frozen=True)
class Shape:
    """What the inspector needs of the model's config: window, rates per layer (0: sliding only)."""
    window: int = 128
    csa_rate: int = 4
    hca_rate: int = 128
    rates: dict = field(default_factory=dict)  # layer -> rate, every layer

    @classmethod
    def of(cls, config) -> Shape:
        """From a runtime ModelConfig (read by attribute); None gives the defaults."""
        if config is None:
            return cls()
        return cls(config.sliding_window, config.csa_rate, config.hca_rate,
                   {l: config.rate(l) for l in range(config.num_hidden_layers)})


@dataclass(frozen=True)
class SourceView:
    """A window of one document's lines for the source viewer; `heat` in [0, 1] per line shown."""
    name: str
    first_line: int  # 1-based number of lines[0]
    lines: list[str]
    heat: list[float]
    target: tuple[int, int]  # line range to mark and scroll to (0, 0: none)
    total_lines: int
    caption: str


@dataclass(frozen=True)
class Target:
    """A parsed viewer target. kind: src (turn, index), cell (layer, column), pos (position), file (name,
    line a, last line b: 0 for the one line a)."""
    kind: str
    a: int = 0
    b: int = 0
    name: str = ""


def parse_target(text: str) -> Target:
    """'src:<turn>:<i>', 'cell:<layer>:<column>', 'pos:<position>', 'file:<name>:<line>' or
    'file:<name>:<first line>-<last line>'."""
    kind, _, rest = (text or "").partition(":")
    try:
        if kind in ("src", "cell"):
            a, b = (int(x) for x in rest.split(":"))
            return Target(kind, a, b)
        if kind == "pos":
            return Target(kind, int(rest))
        if kind == "file":
            name, _, line = rest.rpartition(":")
            first, dash, last = line.partition("-")
            if name:
                return Target(kind, int(first), int(last) if dash else 0, name=name)
    except ValueError:
        pass
    raise InputError(f"nothing to open at {text!r}")


def parse_focus(value: Any, n_tokens: int) -> Focus:
    """The focus a value names (a dropdown's value, a token chip's click): one of the answer's `n_tokens`
    tokens ('3' or 3), a span of them ('2-5' or (2, 5): first and last, in either order; a span of one
    token is that token), or None: the whole answer, and anything that is not tokens of this answer."""
    if value in (None, "", WHOLE):
        return None
    try:
        if isinstance(value, (tuple, list)):
            a, b = (int(x) for x in value)
        elif isinstance(value, str) and "-" in value.strip()[1:]:
            a, b = (int(x) for x in value.strip().split("-"))
        else:
            a = b = int(value)
    except (TypeError, ValueError):
        return None
    a, b = min(a, b), max(a, b)
    if not (0 <= a and b < n_tokens):
        return None
    return a if a == b else (a, b)


def focus_tokens(focus: Focus) -> list[int] | None:
    """The answer token indices a focus sums over (None: the whole answer)."""
    if focus is None:
        return None
    if isinstance(focus, tuple):
        return list(range(focus[0], focus[1] + 1))
    return [focus]


def focus_value(focus: Focus) -> str:
    """The dropdown's value for a focus: 'all', '3' or '2-5'."""
    if focus is None:
        return WHOLE
    return f"{focus[0]}-{focus[1]}" if isinstance(focus, tuple) else str(focus)


def span_text(provenance, focus: Focus, limit: int = 40) -> str:
    """The answer text of a focus's tokens, cut to `limit` characters."""
    if provenance is None or focus is None:
        return ""
    text = "".join(provenance.tokens[k].text for k in focus_tokens(focus))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def focus_name(focus: Focus) -> str:
    """'answer token #3' or 'answer tokens #2–#5'; '' for the whole answer."""
    if focus is None:
        return ""
    return f"answer tokens #{focus[0]}–#{focus[1]}" if isinstance(focus, tuple) else f"answer token #{focus}"


def focus_label(provenance, focus: Focus) -> str:
    """focus_name and the tokens' text: "answer tokens #2–#5 '8204'" (unescaped); '' for the whole answer."""
    return f"{focus_name(focus)} {span_text(provenance, focus)!r}" if focus is not None else ""


def answer_tokens(provenance) -> list[tuple[int, str]]:
    """(index, text) of each generated token of the answer (none without a provenance)."""
    return [] if provenance is None else [(t.index, t.text) for t in provenance.tokens]


def focus_choices(provenance, focus: Focus = None) -> list[tuple[str, str]]:
    """(label, value) per answer token, after the whole answer; a span focus adds its own entry."""
    out = [("Whole answer", WHOLE)]
    if isinstance(focus, tuple):
        out.append((f"#{focus[0]}–#{focus[1]} {span_text(provenance, focus)!r}", focus_value(focus)))
    if provenance is not None:
        out += [(f"#{t.index} {t.text!r}", str(t.index)) for t in provenance.tokens]
    return out


# ------------------------------------------------------------------------------------ selection
def selection(provenance, focus: Focus, counts: bool = False) -> tuple[dict, dict]:
    """({CSA layer: value per entry}, {HCA layer: weight per entry}) of the whole answer (focus None),
    of its answer token `focus` or summed over a span of them ((first, last)); `counts`: times picked
    instead of attention weight (for tokens: 1 per pick). Provenance.selection sums any set of tokens."""
    if provenance is None:
        return {}, {}
    return provenance.selection(focus_tokens(focus), counts)


def cell_entries(rate: int, n_context: int, column: int, columns: int = HEAT_COLUMNS) -> tuple[int, int] | None:
    """Entries [a, b) a heatmap column covers (the figure bins entries of `rate` tokens into at most
    `columns` columns), or None past the last column."""
    edges, _ = F.bin_positions(np.zeros(0), rate, n_context, columns)
    if not 0 <= column < len(edges) - 1:
        return None
    return int(edges[column]) // rate, -(-int(edges[column + 1]) // rate)


def cell_position(provenance, layer: int, column: int, focus: Focus,
                  columns: int = HEAT_COLUMNS) -> int | None:
    """Context position of the heaviest selected entry in heatmap cell (CSA layer, column)."""
    if provenance is None:
        return None
    sel = selection(provenance, focus)[0].get(layer)
    if sel is None:
        return None
    rate = provenance.rates[layer]
    span = cell_entries(rate, provenance.n_context, column, columns)
    if span is None:
        return None
    part = sel[span[0]:span[1]]
    if part.size == 0 or not np.any(part > 0):
        return None
    return (span[0] + int(np.argmax(part))) * rate


# ------------------------------------------------------------------------------------ corpus text
def describe(layout, offset: int, tok_start: int, tok_end: int) -> str:
    """'a.py:3-9; b.md:1-2' for context tokens [tok_start, tok_end) (a figure's hover text)."""
    if layout is None:
        return ""
    spans = layout.locate(tok_start - offset, tok_end - offset)
    return "; ".join(f"{s.name}:{s.line_start}-{s.line_end}" if s.line_start else f"{s.name} (header)"
                     for s in spans)


class LineCache:
    """Documents split into lines, a few at a time (the viewer reopens the same ones)."""

    def __init__(self, keep: int = 8):
        self.keep, self._lines = keep, {}

    def get(self, layout, i: int) -> list[str]:
        """Document i's lines; a final newline ends the last line, it does not start one (as in the layout)."""
        if i not in self._lines:
            if len(self._lines) >= self.keep:
                self._lines.clear()
            text = layout.texts[i]
            self._lines[i] = (text[:-1] if text.endswith("\n") else text).split("\n")
        return self._lines[i]

    def clear(self) -> None:
        self._lines.clear()


def line_heat(csa: dict, rates: dict, layout, offset: int, i: int) -> dict[int, float]:
    """Line -> attention weight (summed over the `csa` layers) of the selected entries in document
    `i`: an entry's weight is shared evenly by the lines of its tokens inside that document."""
    d = layout.documents[i]
    lo, hi = d.text_start + offset, d.text_end + offset  # context positions of its text
    heat: dict[int, float] = {}
    for layer, arr in csa.items():
        rate = rates[layer]
        first = lo // rate
        ids = np.flatnonzero(arr[first: -(-hi // rate)]) + first
        for e in ids.tolist():
            for s in layout.locate(e * rate - offset, e * rate + rate - offset):
                if s.name == d.name and s.line_start > 0:
                    share = float(arr[e]) / (s.line_end - s.line_start + 1)
                    for k in range(s.line_start, s.line_end + 1):
                        heat[k] = heat.get(k, 0.0) + share
    return heat


def window(name: str, lines: Sequence[str], line_start: int, line_end: int, heat: dict[int, float],
           caption: str = "", size: int = VIEW_LINES) -> SourceView:
    """At most `size` lines of a document centred on [line_start, line_end] (clamped to it), each
    line's heat scaled by the document's hottest line."""
    n = len(lines)
    line_start = max(1, min(line_start, n))
    line_end = max(1, min(max(line_end, line_start), n))
    mid = (line_start + line_end) // 2
    first = max(1, min(mid - size // 2, n - size + 1))
    last = min(n, first + size - 1)
    top = max(heat.values(), default=0.0) or 1.0
    shown = [heat.get(k, 0.0) / top for k in range(first, last + 1)]
    return SourceView(name, first, list(lines[first - 1:last]), shown, (line_start, line_end), n, caption)


# ------------------------------------------------------------------------------------ the inspector
@dataclass
class Inspector:
    """The inspector over one session's plain data: the corpus layout, the last answer's provenance,
    every turn's sources (and selection record and question), the model's shape and the context length."""
    layout: Any = None
    offset: int = 0
    provenance: Any = None
    sources: Sequence[Sequence] = ()  # per turn, heaviest first
    shape: Shape = field(default_factory=Shape)
    n_tokens: int = 0  # tokens in the context now (the compression boundary)
    lines: LineCache = field(default_factory=LineCache)
    summaries: Sequence = ()  # per turn: its analysis.TurnSummary, None where none is kept
    questions: Sequence[str] = ()  # per turn

    # ---------------------------------------------------------------- the viewer
    def open(self, target: str, focus: Focus) -> SourceView:
        """The viewer for a target string (see parse_target); InputError when there is nothing there."""
        t = parse_target(target)
        if t.kind == "src":
            if not (0 <= t.a < len(self.sources) and 0 <= t.b < len(self.sources[t.a])):
                raise InputError(f"nothing to open at {target!r}")
            src = self.sources[t.a][t.b]
            last = t.a == len(self.sources) - 1
            layers = ", ".join(map(str, src.layers))
            return self.source(src.file, src.line_start, src.line_end, focus if last else None,
                               caption=f"source {t.b + 1} of answer {t.a + 1} · {src.weight:.0%} of the "
                               f"corpus-bound attention · layers {layers}")
        if t.kind == "cell":
            pos = cell_position(self.provenance, t.a, t.b, focus)
            if pos is None:
                raise InputError("that heatmap cell holds no selected block")
            return self.position(pos, focus, f"picked by CSA layer {t.a}")
        if t.kind == "pos":
            return self.position(t.a, focus)
        return self.source(t.name, t.a, max(t.a, t.b), focus)

    def position(self, pos: int, focus: Focus, why: str = "") -> SourceView:
        """The document text of the CSA entry holding context position `pos`."""
        rate = self.shape.csa_rate
        spans = self.layout.locate(pos - self.offset, pos - self.offset + rate) if self.layout else []
        spans = [s for s in spans if s.line_start > 0]
        if not spans:
            raise InputError(f"context tokens {pos:,}–{pos + rate - 1:,} are not document text "
                             "(file header, chat preamble or the conversation)")
        s = spans[0]
        caption = f"tokens {pos:,}–{pos + rate - 1:,}" + (f" · {why}" if why else "")
        return self.source(s.name, s.line_start, s.line_end, focus, caption=caption)

    def source(self, name: str, line_start: int, line_end: int, focus: Focus, caption: str = "") -> SourceView:
        """Document `name` around lines [line_start, line_end], each line's heat being the share of
        the selected CSA attention (whole answer or token `focus`) that landed on it."""
        if self.layout is None:
            raise InputError("no corpus is loaded")
        names = [d.name for d in self.layout.documents]
        if name not in names:
            raise InputError(f"no document named {name!r} in this corpus")
        i = names.index(name)
        heat = {}
        if self.provenance is not None:
            heat = line_heat(selection(self.provenance, focus)[0], self.provenance.rates, self.layout, self.offset, i)
        return window(name, self.lines.get(self.layout, i), line_start, line_end, heat, caption)

    def first(self, focus: Focus = None) -> SourceView | str:
        """What the viewer opens with: the last answer's top source, else a hint (a string)."""
        if self.sources and self.sources[-1]:
            try:
                return self.open(f"src:{len(self.sources) - 1}:0", focus)
            except InputError as e:
                return str(e)
        if self.layout is not None and self.layout.documents:
            return ("Ask a question, then click a source chip or a heatmap cell to open the document at the lines "
                    "the model attended to.")
        return "Load a corpus to browse its documents here."

    # ---------------------------------------------------------------- the figures
    def figures(self, focus: Focus = None, counts: bool = False) -> tuple:
        """(CSA selection heatmap, attention mass split, HCA weights, compression boundary)."""
        shape, prov = self.shape, self.provenance
        boundary = F.compression_boundary(self.n_tokens, shape.window, shape.rates)
        if prov is None:
            return F.selection_heatmap({}, 0), F.mass_split_bar({}), F.hca_weights({}, 0, rate=shape.hca_rate), boundary
        focus = parse_focus(focus, len(prov.tokens))  # not tokens of this answer: the whole answer
        csa, hca = selection(prov, focus, counts)
        heat = F.selection_heatmap(csa, prov.n_context, prov.docs, ratio=shape.csa_rate, locate=self._describe,
                                   max_columns=HEAT_COLUMNS, value_label=MEASURES[1] if counts else MEASURES[0])
        hca_fig = F.hca_weights(hca, prov.n_context, prov.docs, rate=shape.hca_rate)
        mass = F.mass_split_bar(prov.mass)
        if focus is not None:
            heat.update_layout(title_text=f"CSA selection for {escape(focus_label(prov, focus))}")
            hca_fig.update_layout(title_text=f"HCA: heaviest {shape.hca_rate}-token summaries for {focus_name(focus)}")
            # the capture keeps the split averaged over the answer only
            mass.update_layout(title_text="Where the attention mass went, per layer (whole answer)")
        return heat, mass, hca_fig, boundary

    def _describe(self, a: int, b: int) -> str:
        return describe(self.layout, self.offset, a, b)

    def _docs(self) -> list[tuple[str, int, int]]:
        """(name, start, end) context positions of each document, header included (for the figures)."""
        if self.layout is None:
            return []
        return [(d.name, d.token_start + self.offset, d.token_end + self.offset) for d in self.layout.documents]

    # ---------------------------------------------------------------- across answers (app/analysis.py)
    def recorded(self) -> list[int]:
        """Indices of the turns whose selection is recorded (a snapshot reload or the memory budget drops them)."""
        return [i for i, s in enumerate(self.summaries) if s is not None]

    def answer_label(self, i: int, limit: int = 48) -> str:
        q = " ".join(str(self.questions[i]).split()) if i < len(self.questions) else ""
        q = q if len(q) <= limit else q[:limit - 1] + "…"
        return f"answer {i + 1}" + (f": {q}" if q else "")

    def coverage(self) -> A.Coverage:
        """The corpus coverage of every recorded answer so far."""
        n = max([s.n_context for s in self.summaries if s is not None] + [self.n_tokens])
        return A.coverage(self.summaries, n, self.shape.csa_rate, A.text_spans(self.layout, self.offset),
                          self.layout, self.offset)

    def coverage_figure(self, cov: A.Coverage | None = None, rows: int = 12):
        """Share of the entries read per stretch of the context: one row per answer (the last `rows`),
        then any answer."""
        cov = cov if cov is not None else self.coverage()
        if not cov.answers or self.layout is None:
            return F.coverage_strip([], 0)
        labels = [f"answer {i + 1}" for i in self.recorded()]
        strips = list(zip(labels, cov.read_masks))[-rows:] + [("any answer", cov.read_any)]
        return F.coverage_strip(strips, cov.n_context, self._docs(), ratio=cov.rate, max_columns=STRIP_COLUMNS,
                                locate=self._describe)

    def answer_choices(self) -> list[tuple[str, str]]:
        """(label, turn index) of the answers that can be compared."""
        return [(self.answer_label(i), str(i)) for i in self.recorded()]

    def default_pair(self) -> tuple[int | None, int | None]:
        """The two answers Compare opens with: the last two recorded."""
        rec = self.recorded()
        return (rec[-2] if len(rec) > 1 else None), (rec[-1] if rec else None)

    def parse_answer(self, value: Any) -> int | None:
        """A turn index (a dropdown's value) whose selection is recorded, else None."""
        try:
            i = int(value)
        except (TypeError, ValueError):
            return None
        return i if 0 <= i < len(self.summaries) and self.summaries[i] is not None else None

    def comparison(self, i: int, j: int) -> A.Comparison:
        return A.compare(self.summaries[i], self.summaries[j], self.sources[i] if i < len(self.sources) else (),
                         self.sources[j] if j < len(self.sources) else ())

    def compare_figures(self, i: int | None, j: int | None, c: A.Comparison | None = None) -> tuple:
        """(heatmap of answer i, of answer j: one colour scale; their difference j - i; the overlap of
        their picks per layer); `c`: their comparison, when already made."""
        if i is None or j is None:
            why = "Ask two questions, then pick two answers to compare their selections."
            return (F.selection_heatmap({}, 0, empty=why), F.selection_heatmap({}, 0, empty=why),
                    F.difference_heatmap({}, {}, 0), F.overlap_bars({}))
        c = c if c is not None else self.comparison(i, j)
        docs, rate = self._docs(), self.shape.csa_rate
        zmax = F.shared_zmax([c.a, c.b], c.n_context, ratio=rate, max_columns=HEAT_COLUMNS)
        heat = [F.selection_heatmap(sel, c.n_context, docs, ratio=rate, max_columns=HEAT_COLUMNS,
                                    locate=self._describe, value_label=MEASURES[0], zmax=zmax,
                                    title=f"Answer {k + 1}: CSA selection (one colour scale for both)")
                for k, sel in ((i, c.a), (j, c.b))]
        diff = F.difference_heatmap(c.a, c.b, c.n_context, docs, ratio=rate, max_columns=HEAT_COLUMNS,
                                    locate=self._describe, labels=(f"answer {i + 1}", f"answer {j + 1}"))
        overlap = F.overlap_bars(c.counts, labels=(f"answer {i + 1}", f"answer {j + 1}"), jaccard=c.jaccard)
        return heat[0], heat[1], diff, overlap


__all__ = ["HEAT_COLUMNS", "STRIP_COLUMNS", "Inspector", "LineCache", "MEASURES", "Shape", "SourceView", "Target",
           "VIEW_LINES", "WHOLE", "Focus", "answer_tokens", "cell_entries", "cell_position", "describe",
           "focus_choices", "focus_label", "focus_name", "focus_tokens", "focus_value", "line_heat", "parse_focus",
           "parse_target", "selection", "span_text", "window"]
