"""The inspector's Needles tab: synthetic facts planted into a copy of the loaded corpus (the files on disk are
never changed) at chosen depths and documents, asked for one by one (runtime/probe.py `needle_grid`), and
shown as a document x depth grid: found or missed, whether the needle's entry was selected, its best rank,
with the runtime's plain sentences on what the model can and cannot do on this corpus.

A model job like an answer (the registry's `use`, the shared queue, progress, Stop); the probe runs a
session of its own, so while it runs a second cache sits next to the user's. A cell click opens the
document near where its needle went (the planted line is listed under the grid: it is not in the files).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .. import errors as E
from .. import views as W
from . import Context

TITLE = "Needles"


@dataclass
class NeedlesPanel:
    depths: gr.CheckboxGroup
    documents: gr.Dropdown
    mode: gr.Radio
    seed: gr.Number
    run: gr.Button
    stop: gr.Button
    grid: gr.HTML

    @property
    def outputs(self) -> list:
        return [self.documents, self.grid]

    def views(self, ws) -> dict:
        names = [n for n, _, _ in ws.docs]
        return {self.documents: gr.update(choices=names), self.grid: W.needle_html(ws.needles)}


def build(ctx: Context) -> NeedlesPanel:
    with gr.Tab(TITLE, id="needles", elem_id="ll-tab-needles"):
        gr.HTML('<div class="ll-muted">Plant synthetic facts ("The code for the … is …") into a copy of your '
                'documents at chosen depths (your files are not changed), ask for each, and see what the model '
                'found and whether its sparse attention selected the fact. Runs a second cache while it works.</div>')
        with gr.Row():
            depths = gr.CheckboxGroup(list(W.DEPTHS), value=["0", "0.5", "1"], label="depths in each document",
                                      elem_id="ll-needle-depths")
            mode = gr.Radio(list(W.MODES), value="all", label="contexts", elem_id="ll-needle-mode")
        with gr.Row():
            documents = gr.Dropdown(choices=[], value=[], multiselect=True, allow_custom_value=True, scale=3,
                                    label="documents (none chosen: all)", elem_id="ll-needle-docs")
            seed = gr.Number(value=0, precision=0, label="seed", scale=1, elem_id="ll-needle-seed")
        with gr.Row():
            run = gr.Button("Run", variant="primary", size="sm", elem_id="ll-needle-run")
            stop = gr.Button("Stop", variant="stop", size="sm", elem_id="ll-needle-stop")
        grid = gr.HTML(W.needle_html(None), elem_id="ll-needles")
    return NeedlesPanel(depths, documents, mode, seed, run, stop, grid)


def wire(ctx: Context, panel: NeedlesPanel, inspector) -> None:
    registry = ctx.registry

    def run(depths, documents, mode, seed, request: gr.Request, progress=gr.Progress()):
        if ctx.engine is None:
            raise gr.Error(f"No model is loaded: {ctx.problem}")
        k = ctx.key(request)

        def report(p):
            what = "prefill" if p.stage == "prefill" else "questions"
            ctx_part = f" (context {p.context} of {p.contexts})" if p.contexts > 1 else ""
            progress(p.done / max(1, p.total), desc=f"{what}{ctx_part}: {p.done:,} of {p.total:,}")

        try:
            chosen = W.parse_depths(depths)
            with registry.use(k, "testing needles") as ws:
                ws.needle_grid(chosen, documents or None, mode or "all", int(seed or 0), progress=report)
        except Exception as e:
            if E.code_of(e) is None:
                raise gr.Error(f"The needle test failed ({type(e).__name__}: {e}). Your corpus is still "
                               "loaded.") from e
            gr.Warning(E.explain(e, "The needle test could not run").text())
        return {panel.grid: W.needle_html(registry.peek(k).needles)}

    def stop(request: gr.Request):
        ctx.workspace(request).stop_event.set()

    panel.run.click(run, [panel.depths, panel.documents, panel.mode, panel.seed], [panel.grid], api_name="needles",
                    **ctx.model_job)
    panel.stop.click(stop, None, None, queue=False, api_name=False)


__all__ = ["NeedlesPanel", "TITLE", "build", "wire"]
