"""The attention inspector panel: for the whole last answer or one answer token, the CSA selection
heatmap, the source viewer, the attention mass split, the HCA weights and the compression boundary.

What it shows is computed by the view-model (app/inspector_view.py, pure) from the workspace's
plain data; this module lays it out and wires the clicks. A click on a source chip, a document
name or a heatmap cell reaches the server through app/bridge.js (a hidden gr.HTML) as a viewer
target; `open_source` takes the same targets through the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from runtime import figures as F
from .. import inspector_view as V
from .. import render as R
from ..errors import InputError
from . import Context

BRIDGE_JS = (Path(__file__).resolve().parents[1] / "bridge.js").read_text()

# Scroll the source viewer to its opened span whenever it changes.
VIEWER_JS = """
const go = () => {
  const body = element.querySelector('.ll-viewer-body');
  const t = element.querySelector('.ll-target');
  if (body && t) body.scrollTop = Math.max(0, t.offsetTop - body.offsetTop - body.clientHeight / 3);
};
watch('value', go);
go();
"""


@dataclass
class InspectorPanel:
    focus: gr.Dropdown
    measure: gr.Radio
    heatmap: gr.Plot
    viewer: gr.HTML
    mass: gr.Plot
    hca: gr.Plot
    boundary: gr.Plot
    bridge: gr.HTML  # hidden: page clicks -> viewer targets (app/bridge.js)
    target: gr.Textbox  # hidden: the open_source API's input
    open: gr.Button  # hidden: the open_source API

    @property
    def plots(self) -> list:
        return [self.heatmap, self.mass, self.hca, self.boundary]

    @property
    def outputs(self) -> list:
        """What a refresh after a new corpus or answer updates, in the API's order."""
        return [*self.plots, self.focus, self.viewer]

    def views(self, ws, focus: int | None = None, counts: bool = False) -> dict:
        return dict(zip(self.plots, ws.inspector().figures(focus, counts)))

    def reset(self, ws) -> dict:
        """The inspector on the last answer: the whole answer, the default measure, its top source."""
        ws.focus = None
        model = ws.inspector()
        first = model.first()
        return {**dict(zip(self.plots, model.figures())),
                self.focus: gr.update(choices=V.focus_choices(ws.provenance), value=V.WHOLE),
                self.viewer: R.source_view(first) if isinstance(first, V.SourceView) else R.placeholder(first)}


def build(ctx: Context) -> InspectorPanel:
    with gr.Column(elem_classes="ll-panel", elem_id="ll-inspector"):
        gr.HTML('<div class="ll-h">Attention inspector</div><div class="ll-muted">What the last answer attended '
                'to, per layer. Click a heatmap cell or a source chip to open the document at those lines.</div>')
        with gr.Row():
            focus = gr.Dropdown(choices=[("Whole answer", V.WHOLE)], value=V.WHOLE, label="answer token",
                                interactive=True, scale=3, elem_id="ll-focus", allow_custom_value=True)
            measure = gr.Radio(list(V.MEASURES), value=V.MEASURES[0], label="heatmap value", scale=2)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                heatmap = gr.Plot(F.selection_heatmap({}, 0), show_label=False, elem_id="ll-heatmap")
            with gr.Column(scale=2):
                viewer = gr.HTML(R.placeholder("Load a corpus to browse its documents here."), elem_id="ll-viewer",
                                 js_on_load=VIEWER_JS)
        with gr.Row(equal_height=False):
            mass = gr.Plot(F.mass_split_bar({}), show_label=False, elem_id="ll-mass")
            hca = gr.Plot(F.hca_weights({}, 0), show_label=False, elem_id="ll-hca")
        boundary = gr.Plot(F.compression_boundary(0), show_label=False, elem_id="ll-boundary")
    bridge = gr.HTML("", js_on_load=BRIDGE_JS, elem_id="ll-bridge")
    target = gr.Textbox(visible=False)
    open_btn = gr.Button(visible=False)
    return InspectorPanel(focus, measure, heatmap, viewer, mass, hca, boundary, bridge, target, open_btn)


def wire(ctx: Context, inspector: InspectorPanel) -> None:
    def inspect(focus_value, measure, request: gr.Request):
        ws = ctx.workspace(request)
        n = len(ws.provenance.tokens) if ws.provenance is not None else 0
        ws.focus = V.parse_focus(focus_value, n)
        return inspector.views(ws, ws.focus, measure == V.MEASURES[1])

    def open_source(target, request: gr.Request):
        ws = ctx.workspace(request)
        try:
            return R.source_view(ws.inspector().open(str(target or ""), ws.focus))
        except InputError as e:
            return R.placeholder(str(e))

    def open_from_click(evt: gr.EventData, request: gr.Request):
        return open_source(getattr(evt, "ll_target", ""), request)

    inspector.focus.input(inspect, [inspector.focus, inspector.measure], inspector.plots, api_name="inspect",
                          show_progress="minimal")
    inspector.measure.input(inspect, [inspector.focus, inspector.measure], inspector.plots, api_name=False,
                            show_progress="minimal")
    inspector.bridge.click(open_from_click, None, inspector.viewer, api_name=False, show_progress="hidden")
    inspector.open.click(open_source, inspector.target, inspector.viewer, api_name="open_source")


__all__ = ["InspectorPanel", "build", "wire"]
