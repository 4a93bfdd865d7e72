"""The inspector's Compare tab: two answers of the conversation, their CSA selections on one colour
scale, their difference, how much their picks overlap and their top sources side by side.

Computed by app/analysis.py (compare) through the inspector's view-model (app/inspector_view.py)
from each turn's compact selection record. After every answer it opens on the last two answers;
picking others runs `compare` (also an API: turn indices in, the figures and the summary out).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from runtime import figures as F
from .. import render as R
from . import Context

TITLE = "Compare"


@dataclass
class ComparePanel:
    a: gr.Dropdown
    b: gr.Dropdown
    summary: gr.HTML
    heat_a: gr.Plot
    heat_b: gr.Plot
    diff: gr.Plot
    overlap: gr.Plot

    @property
    def shown(self) -> list:
        """What a comparison updates."""
        return [self.summary, self.heat_a, self.heat_b, self.diff, self.overlap]

    @property
    def outputs(self) -> list:
        return [self.a, self.b, *self.shown]

    def show(self, ws, i: int | None, j: int | None) -> dict:
        model = ws.inspector()
        if i is None or j is None:
            return dict(zip(self.shown, (R.compare_summary(None, 0, 0, (), ()), *model.compare_figures(None, None))))
        cmp = model.comparison(i, j)
        summary = R.compare_summary(cmp, i, j, model.sources[i], model.sources[j])
        return dict(zip(self.shown, (summary, *model.compare_figures(i, j, cmp))))

    def views(self, ws) -> dict:
        """The last two answers, and the choice of every recorded one."""
        model = ws.inspector()
        choices = model.answer_choices()
        i, j = model.default_pair()
        return {self.a: gr.update(choices=choices, value=None if i is None else str(i)),
                self.b: gr.update(choices=choices, value=None if j is None else str(j)),
                **self.show(ws, i, j)}


def build(ctx: Context) -> ComparePanel:
    with gr.Tab(TITLE, id="compare", elem_id="ll-tab-compare"):
        gr.HTML('<div class="ll-muted">Two answers of this conversation: where each one\'s sparse attention '
                'looked (one colour scale), where they differ, and how much of what they picked they share. '
                'For one question under two top-k values, use the Counterfactual tab with only index_topk '
                'set.</div>')
        with gr.Row():
            a = gr.Dropdown(choices=[], value=None, label="answer A", interactive=True, elem_id="ll-compare-a",
                            allow_custom_value=True)
            b = gr.Dropdown(choices=[], value=None, label="answer B", interactive=True, elem_id="ll-compare-b",
                            allow_custom_value=True)
        summary = gr.HTML(R.compare_summary(None, 0, 0, (), ()), elem_id="ll-compare-summary")
        heat_a = gr.Plot(F.selection_heatmap({}, 0), show_label=False, elem_id="ll-compare-heat-a")
        heat_b = gr.Plot(F.selection_heatmap({}, 0), show_label=False, elem_id="ll-compare-heat-b")
        diff = gr.Plot(F.difference_heatmap({}, {}, 0), show_label=False, elem_id="ll-compare-diff")
        overlap = gr.Plot(F.overlap_bars({}), show_label=False, elem_id="ll-compare-overlap")
    return ComparePanel(a, b, summary, heat_a, heat_b, diff, overlap)


def wire(ctx: Context, panel: ComparePanel, inspector) -> None:
    def compare(a, b, request: gr.Request):
        ws = ctx.workspace(request)
        model = ws.inspector()
        return panel.show(ws, model.parse_answer(a), model.parse_answer(b))

    panel.a.input(compare, [panel.a, panel.b], panel.shown, api_name="compare", show_progress="minimal")
    panel.b.input(compare, [panel.a, panel.b], panel.shown, api_name=False, show_progress="minimal")


__all__ = ["ComparePanel", "TITLE", "build", "wire"]
