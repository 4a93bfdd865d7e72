"""The inspector's Export tab: what the Selection tab shows (the last answer, or a loaded trace) as files, and
a trace file loaded back into the Selection tab.

- "HTML report": one self-contained file (runtime/report.py: question, answer, sources with their lines,
  the interactive figures with plotly.js inlined, the mass split; opens offline, no CDN);
- "Trace (JSON)": Longlens' trace format; "Trace (SGLang layout)": a /generate-style response holding the
  selection as SGLang's `--enable-return-indexer-topk` sends it (runtime/trace.py);
- "Figures": each figure as PNG and SVG in one zip (kaleido + Chromium; a warning says what is missing);
- "Load a trace": a Longlens JSON, an HTML report or an SGLang response over this corpus, shown in the
  Selection tab like a live answer (an SGLang trace has picks only: "times picked"). A file that does not
  fit (another corpus, another model, not a trace) is refused with the runtime's reason; nothing changes.

Files are written into the session's own export folder (app/sessions.py SessionFiles.exports), removed
with the session. Not model jobs: they read the workspace's plain data (the figures run in a queue of
their own).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from html import escape

import gradio as gr

from runtime import ExportError, report_figures, write_figures, write_report, write_trace

from .. import errors as E
from .. import inspector_view as V
from ..errors import InputError
from . import Context

TITLE = "Export"
KINDS = ("report", "trace", "sglang", "figures")


@dataclass
class ExportPanel:
    report: gr.Button
    trace: gr.Button
    sglang: gr.Button
    figures: gr.Button
    file: gr.File
    upload: gr.File
    status: gr.HTML

    @property
    def outputs(self) -> list:
        return [self.status]

    def views(self, ws) -> dict:
        return {self.status: status_html(ws)}


def status_html(ws) -> str:
    if ws.loaded is not None:
        t = ws.loaded[0]
        origin = "SGLang" if t.origin == "sglang" else "Longlens"
        return (f'<div class="ll-muted">Shown in the Selection tab: a loaded {origin} trace of '
                f'<b>{escape(t.question[:80]) or "an answer"}</b> ({t.n_tokens} answer tokens). '
                'The next answer replaces it.</div>')
    if ws.provenance is not None:
        return '<div class="ll-muted">Exports the last answer (the one the Selection tab shows).</div>'
    return '<div class="ll-muted">Ask a question (or load a trace) to export it.</div>'


def build(ctx: Context) -> ExportPanel:
    with gr.Tab(TITLE, id="export", elem_id="ll-tab-export"):
        gr.HTML('<div class="ll-muted">The answer the Selection tab shows, as a self-contained HTML report (opens '
                'offline), as a trace (Longlens JSON, or SGLang\'s indexer_topk layout), or its figures as PNG and '
                'SVG. A trace file (Longlens JSON, HTML report, or an SGLang /generate response with '
                'indexer_topk) over this corpus loads back into the Selection tab.</div>')
        with gr.Row():
            report = gr.Button("HTML report", size="sm", elem_id="ll-export-report")
            trace = gr.Button("Trace (JSON)", size="sm", elem_id="ll-export-trace")
            sglang = gr.Button("Trace (SGLang layout)", size="sm", elem_id="ll-export-sglang")
            figures = gr.Button("Figures (PNG+SVG zip)", size="sm", elem_id="ll-export-figures")
        file = gr.File(label="download", interactive=False, elem_id="ll-export-file")
        upload = gr.File(label="Load a trace (.json or .html)", file_types=[".json", ".html", ".htm"],
                         type="filepath", elem_id="ll-trace-upload")
        status = gr.HTML('<div class="ll-muted">Ask a question (or load a trace) to export it.</div>',
                         elem_id="ll-export-status")
    return ExportPanel(report, trace, sglang, figures, file, upload, status)


def export(ctx: Context, ws, key: str, kind: str) -> str:
    """Write `kind` of what the Selection tab shows into a new export folder of the session; its path."""
    if ws.layout is None:
        raise InputError("load a corpus and ask a question first")
    trace = ws.answer_trace()
    folder = ctx.files.exports(key)
    if kind == "report":
        return str(write_report(folder / "longlens-report.html", trace, ws.layout))
    if kind in ("trace", "sglang"):
        name = "longlens-trace.json" if kind == "trace" else "longlens-trace.sglang.json"
        return str(write_trace(folder / name, trace, "longlens" if kind == "trace" else kind))
    figs = report_figures(ws.provenance, counts=not trace.weighted)
    paths = write_figures(folder / "figures", figs)
    out = folder / "longlens-figures.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for p in paths:
            z.write(p, p.name)
    return str(out)


def wire(ctx: Context, panel: ExportPanel, inspector) -> None:
    def make(kind: str):
        def run(request: gr.Request):
            ws = ctx.workspace(request)
            try:
                return export(ctx, ws, ctx.key(request), kind)
            except (InputError, ExportError) as e:
                gr.Warning(str(e))
            except Exception as e:
                if E.code_of(e) is None:
                    raise
                gr.Warning(E.explain(e, "Export failed").text())
            return None
        return run

    for kind, button in zip(KINDS, (panel.report, panel.trace, panel.sglang, panel.figures)):
        button.click(make(kind), None, panel.file, api_name=f"export_{kind}", concurrency_id="export",
                     concurrency_limit=2)

    def load(path, request: gr.Request):
        """A trace file into the Selection tab; refused (the page as it was) when it does not fit."""
        ws = ctx.workspace(request)
        if not path:
            return {}
        try:
            if ws.busy:
                raise InputError(f"your session is busy ({ws.busy}); load the trace when it is done")
            trace = ws.load_trace(path)
        except Exception as e:
            if E.code_of(e) is None:
                raise
            gr.Warning(f"This trace cannot be shown: {E.explain(e).message}")
            return {panel.status: status_html(ws), panel.upload: None}
        counts = not trace.weighted
        out = inspector.reset(ws)
        out.update(inspector.views(ws, None, counts))
        out[inspector.measure] = V.MEASURES[1] if counts else V.MEASURES[0]
        out[panel.upload] = None
        gr.Info("Trace loaded: the Selection tab shows it.")
        return out

    panel.upload.upload(load, panel.upload, [*inspector.outputs, inspector.measure, panel.upload],
                        api_name="load_trace", show_progress="minimal")


__all__ = ["ExportPanel", "KINDS", "TITLE", "build", "export", "wire"]
