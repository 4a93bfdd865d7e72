"""The attention inspector panel: tabs of views next to one source viewer.

- Selection: for the whole last answer, one answer token or a span of them (the answer's tokens are
  chips: click one, shift-click another), the CSA selection heatmap, the attention mass split, the
  HCA weights and the compression boundary;
- the views across answers, one tab each (`TABS`): Coverage (app/panels/coverage.py), Compare
  (app/panels/compare.py), Counterfactual (app/panels/counterfactual.py: the last answer again with spans
  excluded or included, or another index_topk), Needles (app/panels/needles.py: facts planted into a copy
  of the corpus) and Export (app/panels/export.py: HTML report, traces, figures; a trace loaded back).

What it shows is computed by the view-models (app/inspector_view.py, app/analysis.py; pure) from the
workspace's plain data; this module lays it out and wires the clicks. A click on a source chip, a
document name, a never-read region or a heatmap cell reaches the server through app/bridge.js (a
hidden gr.HTML) as a viewer target; `open_source` takes the same targets through the API.

A further view is a module like coverage.py -- `build(ctx)` opens its gr.Tab and returns a panel
with `outputs` and `views(ws)` (its refresh after a corpus load or an answer); `wire(ctx, panel,
inspector)` -- listed in `TABS`. The viewer's last target is kept (`Workspace.target`): the
Counterfactual tab's "exclude this" takes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from runtime import figures as F
from .. import inspector_view as V
from .. import render as R
from ..errors import InputError
from . import Context, compare, counterfactual, coverage, export, needles

# The views across answers, one tab each, in this order (see the module docstring).
TABS = (coverage, compare, counterfactual, needles, export)

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

# The answer's token chips (render.token_chips): a click sends that token, a shift-click the span from
# the token clicked before it, "whole answer" the whole answer: trigger('click', {ll_span}). One listener
# on the document (as app/bridge.js), so it outlives re-renders of the chips.
TOKENS_JS = """
(() => {
  const state = window.__longlensTokens = window.__longlensTokens || { anchor: null };
  state.trigger = trigger;
  if (state.bound) return;
  state.bound = true;
  const chipOf = (ev) => ev.target.closest && ev.target.closest('#ll-tokens [data-ll-tok]');
  document.addEventListener('mousedown', (ev) => { if (ev.shiftKey && chipOf(ev)) ev.preventDefault(); });
  document.addEventListener('click', (ev) => {
    const el = chipOf(ev);
    if (!el) return;
    ev.preventDefault();
    const v = el.getAttribute('data-ll-tok');
    if (v === 'all') { state.anchor = null; state.trigger('click', { ll_span: 'all' }); return; }
    const k = Number(v);
    if (ev.shiftKey && state.anchor !== null && state.anchor !== k) {
      state.trigger('click', { ll_span: `${Math.min(state.anchor, k)}-${Math.max(state.anchor, k)}` });
    } else {
      state.anchor = k;
      state.trigger('click', { ll_span: String(k) });
    }
  });
})();
"""


@dataclass
class InspectorPanel:
    focus: gr.Dropdown
    measure: gr.Radio
    tokens: gr.HTML  # the answer's tokens as chips (TOKENS_JS)
    heatmap: gr.Plot
    viewer: gr.HTML
    mass: gr.Plot
    hca: gr.Plot
    boundary: gr.Plot
    bridge: gr.HTML  # hidden: page clicks -> viewer targets (app/bridge.js)
    target: gr.Textbox  # hidden: the open_source API's input
    open: gr.Button  # hidden: the open_source API
    tabs: list  # the panels of TABS, in order

    @property
    def plots(self) -> list:
        return [self.heatmap, self.mass, self.hca, self.boundary]

    @property
    def outputs(self) -> list:
        """What a refresh after a new corpus or answer updates, in the API's order."""
        return [*self.plots, self.focus, self.viewer, self.tokens, *(c for tab in self.tabs for c in tab.outputs)]

    def views(self, ws, focus: V.Focus = None, counts: bool = False) -> dict:
        return dict(zip(self.plots, ws.inspector().figures(focus, counts)))

    def focus_views(self, ws) -> dict:
        """The focus dropdown and the token chips for the workspace's focus."""
        return {self.focus: gr.update(choices=V.focus_choices(ws.provenance, ws.focus), value=V.focus_value(ws.focus)),
                self.tokens: R.token_chips(V.answer_tokens(ws.provenance), ws.focus)}

    def reset(self, ws) -> dict:
        """The inspector on the last answer: the whole answer, the default measure, its top source; the
        views across answers refreshed."""
        ws.focus = None
        model = ws.inspector()
        first = model.first()
        ws.target = f"src:{len(ws.turns) - 1}:0" if isinstance(first, V.SourceView) and ws.turns else ""
        out = {**dict(zip(self.plots, model.figures())), **self.focus_views(ws),
               self.viewer: R.source_view(first) if isinstance(first, V.SourceView) else R.placeholder(first)}
        for tab in self.tabs:
            out.update(tab.views(ws))
        return out


def build(ctx: Context) -> InspectorPanel:
    with gr.Column(elem_classes="ll-panel", elem_id="ll-inspector"):
        gr.HTML('<div class="ll-h">Attention inspector</div><div class="ll-muted">What the answers attended to, per '
                'layer: the last answer token by token, the corpus coverage of the whole conversation, two answers '
                'side by side. Click a heatmap cell, a source chip or a region to open the document at those '
                'lines.</div>')
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=560):
                with gr.Tabs(elem_id="ll-inspector-tabs"):
                    with gr.Tab("Selection", id="selection", elem_id="ll-tab-selection"):
                        with gr.Row():
                            focus = gr.Dropdown(choices=[("Whole answer", V.WHOLE)], value=V.WHOLE,
                                                label="answer token or span", interactive=True, scale=3,
                                                elem_id="ll-focus", allow_custom_value=True)
                            measure = gr.Radio(list(V.MEASURES), value=V.MEASURES[0], label="heatmap value", scale=2)
                        tokens = gr.HTML(R.token_chips([]), elem_id="ll-tokens", js_on_load=TOKENS_JS)
                        heatmap = gr.Plot(F.selection_heatmap({}, 0), show_label=False, elem_id="ll-heatmap")
                        mass = gr.Plot(F.mass_split_bar({}), show_label=False, elem_id="ll-mass")
                        hca = gr.Plot(F.hca_weights({}, 0), show_label=False, elem_id="ll-hca")
                        boundary = gr.Plot(F.compression_boundary(0), show_label=False, elem_id="ll-boundary")
                    tabs = [tab.build(ctx) for tab in TABS]
            with gr.Column(scale=2, min_width=380, elem_id="ll-viewer-col"):
                viewer = gr.HTML(R.placeholder("Load a corpus to browse its documents here."), elem_id="ll-viewer",
                                 js_on_load=VIEWER_JS)
    bridge = gr.HTML("", js_on_load=BRIDGE_JS, elem_id="ll-bridge")
    target = gr.Textbox(visible=False)
    open_btn = gr.Button(visible=False)
    return InspectorPanel(focus, measure, tokens, heatmap, viewer, mass, hca, boundary, bridge, target, open_btn, tabs)


def wire(ctx: Context, inspector: InspectorPanel) -> None:
    def inspect(focus_value, measure, request: gr.Request):
        """The views for a focus: 'all', an answer token ('3') or a span of them ('2-5')."""
        ws = ctx.workspace(request)
        n = len(ws.provenance.tokens) if ws.provenance is not None else 0
        ws.focus = V.parse_focus(focus_value, n)
        return inspector.views(ws, ws.focus, measure == V.MEASURES[1])

    def show_tokens(request: gr.Request):
        ws = ctx.workspace(request)
        return R.token_chips(V.answer_tokens(ws.provenance), ws.focus)

    def select_tokens(measure, evt: gr.EventData, request: gr.Request):
        """A token chip clicked (TOKENS_JS): that token, or the span it closes, or the whole answer."""
        ws = ctx.workspace(request)
        n = len(ws.provenance.tokens) if ws.provenance is not None else 0
        ws.focus = V.parse_focus(getattr(evt, "ll_span", ""), n)
        return {**inspector.views(ws, ws.focus, measure == V.MEASURES[1]), **inspector.focus_views(ws)}

    def open_source(target, request: gr.Request):
        ws = ctx.workspace(request)
        try:
            view = R.source_view(ws.inspector().open(str(target or ""), ws.focus))
            ws.target = str(target or "")  # what "exclude this" takes (the Counterfactual tab)
            return view
        except InputError as e:
            return R.placeholder(str(e))

    def open_from_click(evt: gr.EventData, request: gr.Request):
        return open_source(getattr(evt, "ll_target", ""), request)

    inspector.focus.input(inspect, [inspector.focus, inspector.measure], inspector.plots, api_name="inspect",
                          show_progress="minimal").then(show_tokens, None, inspector.tokens, api_name=False,
                                                        show_progress="hidden")
    inspector.tokens.click(select_tokens, inspector.measure, [*inspector.plots, inspector.focus, inspector.tokens],
                           api_name=False, show_progress="minimal")
    inspector.measure.input(inspect, [inspector.focus, inspector.measure], inspector.plots, api_name=False,
                            show_progress="minimal")
    inspector.bridge.click(open_from_click, None, inspector.viewer, api_name=False, show_progress="hidden")
    inspector.open.click(open_source, inspector.target, inspector.viewer, api_name="open_source")
    for tab, panel in zip(TABS, inspector.tabs):
        tab.wire(ctx, panel, inspector)


__all__ = ["InspectorPanel", "build", "wire"]
