"""View-models of the inspector's Counterfactual, Needles and Export tabs: plain data in, HTML and figures out.

Inputs are what the runtime hands the app, read by attribute only (nothing here imports torch):
- a counterfactual (runtime Counterfactual: `question`, `steering` with `exclude` / `include` /
  `index_topk`, `old` / `new` Answers with `text`, `stop_reason`, `provenance`; `changed`, `selection`
  {layer: SelectionDiff}, `mass` {layer: LayerMass}, `spans` [SpanWeight], `describe`);
- a needle grid (runtime NeedleGrid: `depths`, `rows()`, `summary()`, cells with `ok`, `selected`,
  `rank`, `miss`, `output`, `needle` (`document`, `line`, `sentence`, `value`, `question`));
- the inspector's view-model (app/inspector_view.py) for viewer targets and the corpus names.

Steering specs as the page takes them (`parse_specs`): comma-separated `FILE`, `FILE:N`, `FILE:A-B`
(lines, 1-based, inclusive) or `tokens:A-B` (context positions, inclusive), the form "exclude this"
writes for a heatmap cell (an entry's own tokens: exact, where a line spec would take whole lines).

Pure: numpy, plotly (via runtime.figures) and the standard library; no gradio, no torch.
"""

from __future__ import annotations

import re
from html import escape
from typing import Any, Sequence

from runtime import figures as F
from . import inspector_view as V
from .errors import InputError

DEPTHS = ("0", "0.25", "0.5", "0.75", "1")  # the Needles tab's depth choices
MODES = (("all needles in one context", "all"), ("one needle per context", "one"))
_TOKENS = re.compile(r"^tokens?:\s*(\d+)\s*(?:-\s*(\d+))?$")


# ------------------------------------------------------------------------------------ steering specs
def parse_specs(text: str) -> list:
    """The spans of a spec box: line specs as strings (the runtime checks them against the corpus) and
    `tokens:A-B` as (A, B + 1) context ranges. Empty parts are skipped."""
    out: list = []
    for part in (text or "").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        m = _TOKENS.match(part)
        if m:
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            if b < a:
                raise InputError(f"{part}: the first token must not be after the last")
            out.append((a, b + 1))
        else:
            out.append(part)
    return out


def add_spec(text: str, spec: str) -> str:
    """`text` with `spec` appended (once)."""
    parts = [p.strip() for p in (text or "").split(",") if p.strip()]
    return ", ".join(parts if spec in parts else [*parts, spec])


def parse_topk(value: Any) -> int | None:
    """The index_topk box: empty or 0 = the model's own."""
    if value in (None, ""):
        return None
    try:
        k = int(float(value))
    except (TypeError, ValueError):
        raise InputError(f"index_topk must be a whole number, not {value!r}") from None
    if k < 0:
        raise InputError("index_topk must be positive (empty: the model's own)")
    return k or None


def target_spec(model: V.Inspector, target: str, focus: V.Focus = None) -> str:
    """The steering spec of what the viewer shows now (its last target): a source chip or a document range
    as its lines ('FILE:A-B'), a heatmap cell as the tokens of the heaviest entry picked there
    ('tokens:A-B'), an HCA click as the CSA entry holding that position. InputError when there is none."""
    if not target:
        raise InputError("click a heatmap cell, a source chip or a document region first: "
                         "'exclude this' takes what the source viewer shows")
    t = V.parse_target(target)
    if t.kind == "src":
        if not (0 <= t.a < len(model.sources) and 0 <= t.b < len(model.sources[t.a])):
            raise InputError(f"nothing to steer at {target!r}")
        s = model.sources[t.a][t.b]
        return f"{s.file}:{s.line_start}-{s.line_end}" if s.line_end > s.line_start else f"{s.file}:{s.line_start}"
    if t.kind == "file":
        last = max(t.a, t.b)
        return f"{t.name}:{t.a}-{last}" if last > t.a else f"{t.name}:{t.a}"
    rate = model.shape.csa_rate
    if t.kind == "cell":
        pos = V.cell_position(model.provenance, t.a, t.b, focus)
        if pos is None:
            raise InputError("that heatmap cell holds no selected block")
        rate = model.provenance.rates.get(t.a, rate)
    else:  # pos
        pos = t.a // rate * rate
    return f"tokens:{pos}-{pos + rate - 1}"


def target_label(model: V.Inspector, spec: str) -> str:
    """'tokens:A-B (file:lines)' for a token spec, the spec itself otherwise."""
    m = _TOKENS.match(spec)
    if not m:
        return spec
    where = V.describe(model.layout, model.offset, int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
    return f"{spec} ({where})" if where else spec


# ------------------------------------------------------------------------------------ counterfactual
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _answer_box(title: str, answer, cls: str) -> str:
    text = escape(getattr(answer, "text", "") or "") or '<span class="ll-muted">(no tokens)</span>'
    why = escape(getattr(answer, "stop_reason", "") or "")
    return (f'<div class="ll-cf-answer {cls}"><div class="ll-cf-title">{title}</div>'
            f'<div class="ll-cf-text">{text}</div><div class="ll-muted">stopped: {why}</div></div>')


def steering_text(steering) -> str:
    """What was steered, in words."""
    parts = []
    for kind in ("exclude", "include"):
        spans = getattr(steering, kind, ())
        if spans:
            parts.append(f"{kind}d {len(spans)} span{'s' if len(spans) != 1 else ''}")
    if getattr(steering, "index_topk", None):
        parts.append(f"index_topk {steering.index_topk}")
    return ", ".join(parts) or "nothing steered (the answer replayed as asked)"


def counterfactual_html(cf, scope_note: str) -> str:
    """Both answers side by side, then what the selection dropped and added per CSA layer (with where the
    heaviest went), the attention mass that moved per layer, and the weight on each steered span."""
    if cf is None:
        return ('<div class="ll-placeholder">Ask a question, then choose spans to exclude or include (or another '
                'index_topk) and press Run: the answer is regenerated from the cache mark before it, with no '
                f'prefill.</div><div class="ll-cf-scope">{escape(scope_note)}</div>')
    badge = ('<span class="ll-cf-changed">the answer changed</span>' if cf.changed
             else '<span class="ll-cf-same">the answer is the same</span>')
    head = (f'<div class="ll-cf-head"><b>{escape(cf.question)}</b> · {escape(steering_text(cf.steering))} · '
            f'{badge}</div><div class="ll-cf-scope">{escape(scope_note)}</div>')
    answers = ('<div class="ll-cf-answers">' + _answer_box("Before (as asked)", cf.old, "ll-cf-old")
               + _answer_box("After (steered)", cf.new, "ll-cf-new") + "</div>")
    describe = cf.describe or (lambda a, b: "")
    rows = []
    for layer, d in sorted(cf.selection.items()):
        drop = d.where("dropped", describe, 2)
        add = d.where("added", describe, 2)
        fmt = lambda xs: "; ".join(f"{escape(w)} ({_pct(v)})" for w, v in xs) or "—"  # noqa: E731
        rows.append(f"<tr><td>L{layer}</td><td>{d.kept}</td><td>{len(d.dropped)}</td><td>{_pct(d.dropped_weight)}</td>"
                    f"<td class='ll-cf-where'>{fmt(drop)}</td><td>{len(d.added)}</td><td>{_pct(d.added_weight)}</td>"
                    f"<td class='ll-cf-where'>{fmt(add)}</td></tr>")
    sel = ('<div class="ll-h2">Selection difference (CSA layers, whole answer)</div>'
           '<table class="ll-table ll-cf-selection"><tr><th>layer</th><th>kept</th><th>dropped</th><th>its weight</th>'
           '<th>heaviest dropped</th><th>added</th><th>its weight</th><th>heaviest added</th></tr>'
           + "".join(rows) + "</table>") if rows else ""
    mrows = []
    for layer, m in sorted(cf.mass.items()):
        cells = "".join(f"<td>{_pct(b)} → {_pct(a)} <span class='{'ll-up' if a > b else 'll-down'}'>"
                        f"({'+' if a >= b else '−'}{_pct(abs(a - b))})</span></td>"
                        for b, a in zip(m.before, m.after))
        mrows.append(f"<tr><td>L{layer}</td>{cells}</tr>")
    mass = ('<div class="ll-h2">Attention mass that moved (before → after)</div>'
            '<table class="ll-table ll-cf-mass"><tr><th>layer</th><th>window</th><th>compressed</th><th>sink</th></tr>'
            + "".join(mrows) + "</table>") if mrows else ""
    srows = []
    for s in cf.spans:
        mean = lambda d: sum(d.values()) / len(d) if d else 0.0  # noqa: E731
        srows.append(f"<tr><td>{s.kind}</td><td>{escape(s.where or f'tokens {s.token_start}-{s.token_end - 1}')}</td>"
                     f"<td>{_pct(mean(s.csa_before))} → {_pct(mean(s.csa_after))}</td>"
                     f"<td>{_pct(mean(s.hca_before))} → {_pct(mean(s.hca_after))}</td></tr>")
    spans = ('<div class="ll-h2">Weight on the steered spans (mean over layers, per answer token)</div>'
             '<table class="ll-table ll-cf-spans"><tr><th>steered</th><th>where</th><th>CSA before → after</th>'
             '<th>HCA (not steered)</th></tr>' + "".join(srows) + "</table>") if srows else ""
    return head + answers + sel + mass + spans


def counterfactual_figures(cf, model: V.Inspector) -> tuple:
    """(heatmap before, heatmap after: one colour scale; their difference after − before)."""
    old = getattr(getattr(cf, "old", None), "provenance", None)
    new = getattr(getattr(cf, "new", None), "provenance", None)
    if old is None and new is None:
        why = "Run a counterfactual to see the selection before and after."
        return F.selection_heatmap({}, 0, empty=why), F.selection_heatmap({}, 0, empty=why), F.difference_heatmap({}, {}, 0)
    a = V.selection(old, None)[0] if old is not None else {}
    b = V.selection(new, None)[0] if new is not None else {}
    n = max(p.n_context for p in (old, new) if p is not None)
    rate, docs = model.shape.csa_rate, model._docs()
    locate = model._describe if model.layout is not None else None
    zmax = F.shared_zmax([a, b], n, ratio=rate, max_columns=V.HEAT_COLUMNS)
    heat = [F.selection_heatmap(sel, n, docs, ratio=rate, max_columns=V.HEAT_COLUMNS, locate=locate,
                                value_label=V.MEASURES[0], zmax=zmax,
                                title=f"{name}: CSA selection (one colour scale for both)")
            for name, sel in (("Before", a), ("After", b))]
    diff = F.difference_heatmap(a, b, n, docs, ratio=rate, max_columns=V.HEAT_COLUMNS, locate=locate,
                                labels=("before", "after"))
    return heat[0], heat[1], diff


# ------------------------------------------------------------------------------------ needles
def parse_depths(values: Sequence) -> list[float]:
    depths = sorted({float(v) for v in values or ()})
    if not depths:
        raise InputError("choose at least one depth")
    return depths


def needle_html(grid) -> str:
    """The document x depth grid: per cell found or missed, selected or not, the best rank; a click opens
    the document where the needle went (the planted line itself is not in your files: its sentence is
    listed under the grid)."""
    if grid is None:
        return ('<div class="ll-placeholder">Choose depths and documents and press Run: synthetic facts are planted '
                'into a copy of your corpus (your files are not changed) and asked for one by one.</div>')
    head = "".join(f"<th>depth {d:g}</th>" for d in grid.depths)
    rows, listed = [], []
    k = 0
    for doc, cells in grid.rows():
        tds = []
        for c in cells:
            k += 1
            n = c.needle
            verdict = "found" if c.ok else "missed"
            sel = "selected" if c.selected else ("in window" if c.in_window else "not selected")
            rank = f"rank {c.rank}" if c.rank is not None else "no rank"
            title = (f"{n.question} expected {n.value}, answered {c.output.strip()!r}"
                     + (f" ({c.miss})" if c.miss else ""))
            tds.append(f'<td class="ll-needle {"ll-needle-ok" if c.ok else "ll-needle-miss"}" '
                       f'data-ll-open="file:{escape(doc)}:{max(1, n.line - 1)}" '
                       f'title="{escape(title)}"><b>{k}. {verdict}</b><br>{sel} · {rank}</td>')
            listed.append(f"<li><b>{k}.</b> <code>{escape(n.sentence.strip())}</code> planted at "
                          f"{escape(doc)}:{n.line} (depth {n.depth:g}) · answered "
                          f"<code>{escape(c.output.strip()) or '∅'}</code>"
                          + (f" · {escape(c.miss)}" if c.miss else "") + "</li>")
        rows.append(f'<tr><th class="ll-needle-doc">{escape(doc)}</th>{"".join(tds)}</tr>')
    summary = "".join(f"<p>{escape(s)}</p>" for s in grid.summary())
    return (f'<div class="ll-needle-summary">{summary}</div>'
            f'<table class="ll-table ll-needle-grid"><tr><th>document</th>{head}</tr>{"".join(rows)}</table>'
            '<div class="ll-muted">A cell opens its document near where the needle went; the planted lines '
            f'(not in your files):</div><ol class="ll-needle-list">{"".join(listed)}</ol>')


__all__ = ["DEPTHS", "MODES", "add_spec", "counterfactual_figures", "counterfactual_html", "needle_html",
           "parse_depths", "parse_specs", "parse_topk", "steering_text", "target_label", "target_spec"]
