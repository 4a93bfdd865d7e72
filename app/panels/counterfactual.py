"""The inspector's Counterfactual tab: the last answer regenerated with chosen spans forced out of (or into)
every CSA layer's top-k, or with another index_topk, from the cache mark before it (no corpus prefill).

Spans come from what the source viewer shows ("exclude this" / "include this": a source chip or a
document region as its lines, a heatmap cell as the tokens of the entry picked there) or from the spec
boxes (app/views.py `parse_specs`). Run is a model job (the shared queue; Stop ends it); it shows both
answers side by side, the selection difference per CSA layer, the attention mass that moved, the
weight on each steered span and the two selections on one colour scale with their difference, under
the runtime's scope note (runtime/steering.py SCOPE_NOTE: the window and HCA paths are untouched).
With only index_topk set it is "one question with two top-k values", side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from runtime import SCOPE_NOTE
from runtime import figures as F

from .. import errors as E
from .. import views as W
from ..errors import InputError
from . import Context

TITLE = "Counterfactual"


@dataclass
class CounterfactualPanel:
    exclude: gr.Textbox
    include: gr.Textbox
    topk: gr.Number
    exclude_this: gr.Button
    include_this: gr.Button
    run: gr.Button
    stop: gr.Button
    result: gr.HTML
    heat_old: gr.Plot
    heat_new: gr.Plot
    diff: gr.Plot

    @property
    def outputs(self) -> list:
        return [self.result, self.heat_old, self.heat_new, self.diff]

    def views(self, ws) -> dict:
        cf = ws.counterfactual_result
        figs = W.counterfactual_figures(cf, ws.inspector())
        return dict(zip(self.outputs, (W.counterfactual_html(cf, SCOPE_NOTE), *figs)))


def build(ctx: Context) -> CounterfactualPanel:
    with gr.Tab(TITLE, id="counterfactual", elem_id="ll-tab-counterfactual"):
        gr.HTML('<div class="ll-muted">Answer the last question again with chosen spans forced out of (or into) '
                'every CSA layer\'s top-k, or with another index_topk, from the cache mark before it: no prefill. '
                'Open something in the source viewer (a heatmap cell, a source chip, a region) and press '
                '"exclude this", or type specs. With only index_topk set this compares one question under two '
                f'top-k values.</div><div class="ll-cf-scope">{SCOPE_NOTE}</div>')
        with gr.Row():
            exclude_this = gr.Button("Exclude what the viewer shows", size="sm", elem_id="ll-cf-exclude-this")
            include_this = gr.Button("Include what the viewer shows", size="sm", elem_id="ll-cf-include-this")
        with gr.Row():
            exclude = gr.Textbox(label="exclude (FILE, FILE:N, FILE:A-B or tokens:A-B; comma-separated)", scale=3,
                                 elem_id="ll-cf-exclude")
            include = gr.Textbox(label="include (same forms)", scale=3, elem_id="ll-cf-include")
            topk = gr.Number(value=None, label="index_topk (0: the model's)", precision=0, minimum=0, scale=1,
                             elem_id="ll-cf-topk")
        with gr.Row():
            run = gr.Button("Run", variant="primary", size="sm", elem_id="ll-cf-run")
            stop = gr.Button("Stop", variant="stop", size="sm", elem_id="ll-cf-stop")
        result = gr.HTML(W.counterfactual_html(None, SCOPE_NOTE), elem_id="ll-cf-result")
        heat_old = gr.Plot(F.selection_heatmap({}, 0), show_label=False, elem_id="ll-cf-heat-old")
        heat_new = gr.Plot(F.selection_heatmap({}, 0), show_label=False, elem_id="ll-cf-heat-new")
        diff = gr.Plot(F.difference_heatmap({}, {}, 0), show_label=False, elem_id="ll-cf-diff")
    return CounterfactualPanel(exclude, include, topk, exclude_this, include_this, run, stop, result, heat_old,
                               heat_new, diff)


def wire(ctx: Context, panel: CounterfactualPanel, inspector) -> None:
    registry = ctx.registry

    def add_target(text, request: gr.Request):
        """The spec box with what the source viewer shows added."""
        ws = ctx.workspace(request)
        try:
            return W.add_spec(text, W.target_spec(ws.inspector(), ws.target, ws.focus))
        except InputError as e:
            gr.Warning(str(e))
            return gr.update()

    def run(exclude, include, topk, request: gr.Request):
        if ctx.engine is None:
            raise gr.Error(f"No model is loaded: {ctx.problem}")
        k = ctx.key(request)
        try:
            spans_out, spans_in, k_top = W.parse_specs(exclude), W.parse_specs(include), W.parse_topk(topk)
            with registry.use(k, "answering again (counterfactual)") as ws:
                ws.counterfactual(spans_out, spans_in, k_top)
        except Exception as e:
            if E.code_of(e) is None:
                raise gr.Error(f"The model failed ({type(e).__name__}: {e}). Your corpus is still loaded.") from e
            gr.Warning(E.explain(e).text())
        return panel.views(registry.peek(k))

    def stop(request: gr.Request):
        ctx.workspace(request).stop_event.set()

    panel.exclude_this.click(add_target, panel.exclude, panel.exclude, api_name=False, show_progress="hidden")
    panel.include_this.click(add_target, panel.include, panel.include, api_name=False, show_progress="hidden")
    panel.run.click(run, [panel.exclude, panel.include, panel.topk], panel.outputs, api_name="counterfactual",
                    show_progress="minimal", **ctx.model_job)
    panel.stop.click(stop, None, None, queue=False, api_name=False)


__all__ = ["CounterfactualPanel", "TITLE", "build", "wire"]
