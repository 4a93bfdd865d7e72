"""Reports: one answer as a self-contained HTML file, and its figures as PNG and SVG.

    write_report("answer.html", trace, layout)        # trace: runtime.trace.Trace; layout: the corpus (optional)
    read_report("answer.html")                         # -> the Trace it embeds (a report is also a trace)
    figs = report_figures(trace.to_provenance(layout)) # {"csa-selection", "mass-split", "hca-weights"}
    write_figures("figs/", figs)                       # figs/csa-selection.png, .svg, ... (kaleido + Chromium)

The HTML holds the question, the answer with its tokens, the sources (file:lines, weight, layers and
the lines' text), the interactive figures of runtime/figures.py (CSA selection heatmap with document
boundaries, attention mass split, HCA weights) with plotly.js inlined once, a PNG and an SVG button
under each figure (plotly.js draws them in the browser), and the trace JSON in a
<script type="application/json" id="longlens-trace">. It loads nothing: no CDN, no web font, and a
Content-Security-Policy that forbids every fetch, so it opens the same offline.

PNG/SVG files outside a browser come from kaleido (>= 1, pinned in requirements.txt), which drives a
local Chromium (Debian's /usr/bin/chromium, or BROWSER_PATH) with plotly.py's bundled plotly.js and
MathJax off, so it needs no network either; without kaleido or Chromium, `write_figures` raises
`ExportError` saying what is missing, and the report's buttons still export.

Pure apart from plotly (and kaleido, imported only by write_figures / figure_image).
"""

from __future__ import annotations

import datetime
from html import escape
from pathlib import Path
from typing import Sequence

from . import figures as F
from .trace import SCRIPT_ID, Trace, trace_from_html

HEAT_COLUMNS = 2000  # as the app's inspector (app/inspector_view.py)
MEASURES = ("attention weight", "times picked")
SOURCE_LINES = 40  # most lines of a source's text shown in a report
FIGURES = ("csa-selection", "mass-split", "hca-weights")
IMAGE_WIDTH = 1100  # px of exported images (their height is the figure's)
CSP = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
       "img-src data: blob:; font-src data:")


class ExportError(RuntimeError):
    """Static image export is not possible here (kaleido or Chromium missing); the message says which."""


# ------------------------------------------------------------------------------------ figures
def report_figures(prov, counts: bool = False, focus: int | None = None) -> dict:
    """The report's figures of a Provenance (live, or Trace.to_provenance): name -> plotly Figure, drawn
    as the app's inspector draws them. `counts`: times picked instead of attention weight."""
    csa_rate = next((prov.rates[l] for l in prov.csa), 4)
    hca_rate = next((prov.rates[l] for l in prov.hca), 128)
    csa, hca = prov.selection(None if focus is None else [focus], counts)
    locate = prov.describe if prov.layout is not None else None
    heat = F.selection_heatmap(csa, prov.n_context, prov.docs, ratio=csa_rate, locate=locate,
                               max_columns=HEAT_COLUMNS, value_label=MEASURES[1] if counts else MEASURES[0])
    return {"csa-selection": heat, "mass-split": F.mass_split_bar(prov.mass),
            "hca-weights": F.hca_weights(hca, prov.n_context, prov.docs, rate=hca_rate)}


def _size(fig) -> tuple[int, int]:
    return IMAGE_WIDTH, int(fig.layout.height or 400)


def write_figures(directory: str | Path, figures: dict, formats: Sequence[str] = ("png", "svg"),
                  scale: float = 2.0) -> list[Path]:
    """Each figure as `<directory>/<name>.<format>` through kaleido (one Chromium for all); returns the
    paths. PNGs are drawn at `scale` (2: sharp on high-density screens), SVGs at 1."""
    kaleido = _kaleido()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    jobs, paths = [], []
    for name, fig in figures.items():
        w, h = _size(fig)
        for fmt in formats:
            if fmt not in ("png", "svg"):
                raise ValueError(f"image format must be png or svg, not {fmt!r}")
            path = directory / f"{name}.{fmt}"
            jobs.append({"fig": fig, "path": path,
                         "opts": {"format": fmt, "width": w, "height": h, "scale": scale if fmt == "png" else 1}})
            paths.append(path)
    try:
        kaleido.write_fig_from_object_sync(jobs, kopts={"mathjax": False}, cancel_on_error=True)
    except Exception as e:  # kaleido's errors are its own classes (ChromeNotFoundError, ...)
        raise ExportError(_why(e)) from None
    return paths


def figure_image(fig, fmt: str = "png", scale: float = 2.0) -> bytes:
    """One figure as PNG or SVG bytes (kaleido)."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"image format must be png or svg, not {fmt!r}")
    kaleido = _kaleido()
    w, h = _size(fig)
    try:
        return kaleido.calc_fig_sync(fig, opts={"format": fmt, "width": w, "height": h,
                                                "scale": scale if fmt == "png" else 1}, kopts={"mathjax": False})
    except Exception as e:
        raise ExportError(_why(e)) from None


def _kaleido():
    try:
        import kaleido
    except ImportError:
        raise ExportError("PNG/SVG export needs kaleido (pip install -r requirements.txt); the HTML report's "
                          "buttons export them in a browser") from None
    return kaleido


def _why(e: Exception) -> str:
    if type(e).__name__ == "ChromeNotFoundError":
        return ("PNG/SVG export needs Chromium (apt-get install chromium, or set BROWSER_PATH); the HTML "
                "report's buttons export them in a browser")
    return f"PNG/SVG export failed ({type(e).__name__}: {e})"


# ------------------------------------------------------------------------------------ HTML
STYLE = """
:root { --ink: #1f2328; --muted: #656d76; --line: #d0d7de; --tint: #f6f8fa; --accent: #4C78A8; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1180px; padding: 24px; color: var(--ink); line-height: 1.45;
       font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; }
h1 { font-size: 1.5rem; margin: 0 0 4px; } h2 { font-size: 1.15rem; margin: 28px 0 8px; }
.meta { color: var(--muted); font-size: .9rem; margin: 0; }
.question, .answer { font-size: 1.05rem; white-space: pre-wrap; background: var(--tint); border: 1px solid var(--line);
                     border-radius: 6px; padding: 10px 14px; margin: 0; }
.tokens { display: flex; flex-wrap: wrap; gap: 4px; padding: 8px 0; }
.tok { font-family: ui-monospace, 'SFMono-Regular', Menlo, Consolas, monospace; font-size: .85rem; white-space: pre;
       border: 1px solid var(--line); border-radius: 4px; padding: 1px 5px; background: #fff; }
.tok small { color: var(--muted); }
ol.sources { padding-left: 1.4rem; } ol.sources li { margin-bottom: 14px; }
.where { font-weight: 600; } .why { color: var(--muted); font-size: .9rem; }
pre.lines { margin: 6px 0 0; padding: 8px 10px; background: var(--tint); border: 1px solid var(--line); border-radius: 6px;
            overflow-x: auto; font-size: .82rem; line-height: 1.35; }
pre.lines .n { color: var(--muted); user-select: none; display: inline-block; min-width: 3.5em; }
figure { margin: 14px 0 22px; border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
figcaption { display: flex; gap: 8px; align-items: center; color: var(--muted); font-size: .85rem; padding: 4px 6px; }
figcaption button { font: inherit; border: 1px solid var(--line); background: #fff; border-radius: 4px; padding: 2px 10px;
                    cursor: pointer; }
.note { color: var(--muted); font-size: .9rem; }
"""

BUTTONS_JS = """
document.querySelectorAll('button[data-export]').forEach(function (b) {
  b.addEventListener('click', function () {
    var gd = document.getElementById(b.dataset.figure);
    Plotly.downloadImage(gd, {format: b.dataset.export, filename: b.dataset.figure,
                              width: Number(b.dataset.width), height: Number(b.dataset.height)});
  });
});
"""


def _plotlyjs() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _script_json(text: str) -> str:
    """JSON safe inside <script>: '<' only occurs in strings there, and \\u003c reads back the same."""
    return text.replace("<", "\\u003c")


def _source_lines(src, layout) -> str:
    """The source's lines, numbered, from the corpus text (else its snippet)."""
    lines = None
    if layout is not None:
        names = [d.name for d in layout.documents]
        if src.file in names:
            text = layout.texts[names.index(src.file)]
            lines = (text[:-1] if text.endswith("\n") else text).split("\n")
    if lines is None:
        shown = src.snippet.split("\n")[:SOURCE_LINES]
        first = src.line_start
    else:
        first = max(1, src.line_start)
        shown = lines[first - 1:min(src.line_end, first + SOURCE_LINES - 1)]
    more = src.line_end - src.line_start + 1 - len(shown)
    rows = [f'<span class="n">{first + i}</span>{escape(line)}' for i, line in enumerate(shown)]
    if more > 0:
        rows.append(f'<span class="n"></span>… {more} more line{"s" if more > 1 else ""}')
    return '<pre class="lines">' + "\n".join(rows) + "</pre>"


def report_html(trace: Trace, layout=None, *, title: str | None = None, provenance=None) -> str:
    """The report of `trace` as one HTML string (see the module docstring). `layout`: the corpus the trace
    was made over (sources' text, hover file:line; checked against the trace's documents); `provenance`:
    an already built trace.to_provenance(layout)."""
    prov = provenance if provenance is not None else trace.to_provenance(layout)
    counts = not trace.weighted
    figs = report_figures(prov, counts=counts)
    measure = MEASURES[1] if counts else MEASURES[0]
    title = title or f"Longlens: {trace.question[:80]}"

    meta = [f"model {escape(trace.model_name or 'unnamed')}" + (f" ({trace.model[:12]})" if trace.model else ""),
            f"{len(trace.documents)} document{'s' if len(trace.documents) != 1 else ''}",
            f"{trace.n_context:,}-token context", f"{trace.n_tokens} answer token{'s' if trace.n_tokens != 1 else ''}",
            f"selection from {'SGLang (--enable-return-indexer-topk)' if trace.origin == 'sglang' else 'Longlens'}",
            "written " + datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")]
    toks = "".join(f'<span class="tok" title="answer token #{i} · id {tid} · context position {pos:,}">'
                   f'{escape(piece) or "&#8203;"}<small> #{i}</small></span>'
                   for i, (piece, tid, pos) in enumerate(zip(trace.pieces, trace.answer_ids, trace.query_positions)))
    if prov.sources:
        items = []
        for s in prov.sources:
            share = (f"{s.weight:.1%} of the corpus-bound {'picks' if counts else 'compressed attention'}")
            items.append(f'<li><span class="where">{escape(s.file)}:{s.line_start}-{s.line_end}</span> '
                         f'<span class="why">{share} · layers {", ".join(map(str, s.layers))}</span>'
                         f'{_source_lines(s, layout)}</li>')
        sources = '<ol class="sources">' + "".join(items) + "</ol>"
    else:
        sources = '<p class="note">No sources: the selection landed on no corpus text' + (
            "" if layout is not None or trace.sources else " (or no corpus was given to place it)") + ".</p>"

    plots = []
    for name, fig in figs.items():
        w, h = _size(fig)
        div = fig.to_html(include_plotlyjs=False, full_html=False, div_id=f"fig-{name}",
                          config={"displaylogo": False, "responsive": True})
        plots.append(f'<figure>{div}<figcaption>{escape(name)}: '
                     f'<button type="button" data-export="png" data-figure="fig-{name}" data-width="{w}" '
                     f'data-height="{h}">PNG</button>'
                     f'<button type="button" data-export="svg" data-figure="fig-{name}" data-width="{w}" '
                     f'data-height="{h}">SVG</button></figcaption></figure>')
    note = (f"Heatmap values: {measure}, summed over the answer's tokens."
            + (" This selection came from SGLang: it holds which entries the indexer picked, not the attention "
               "weights, so there is no HCA or mass split." if counts else ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="Longlens">
<title>{escape(title)}</title>
<style>{STYLE}</style>
<script>{_plotlyjs()}</script>
</head><body>
<header><h1>Longlens answer report</h1><p class="meta">{' · '.join(meta)}</p></header>
<section><h2>Question</h2><p class="question">{escape(trace.question)}</p></section>
<section><h2>Answer</h2><p class="answer">{escape(trace.answer)}</p>
<div class="tokens" aria-label="answer tokens">{toks}</div></section>
<section><h2>Sources</h2>{sources}</section>
<section><h2>Where the sparse attention looked</h2><p class="note">{escape(note)}</p>
{''.join(plots)}</section>
<script type="application/json" id="{SCRIPT_ID}">{_script_json(trace.to_json())}</script>
<script>{BUTTONS_JS}</script>
</body></html>
"""


def write_report(path: str | Path, trace: Trace, layout=None, **kw) -> Path:
    """Write report_html(trace, layout, **kw) to `path`; returns the path."""
    path = Path(path)
    path.write_text(report_html(trace, layout, **kw), encoding="utf-8")
    return path


def read_report(path: str | Path) -> Trace:
    """The trace a report embeds."""
    return trace_from_html(Path(path).read_text(encoding="utf-8"))


__all__ = ["CSP", "ExportError", "FIGURES", "MEASURES", "figure_image", "read_report", "report_figures", "report_html",
           "write_figures", "write_report"]
