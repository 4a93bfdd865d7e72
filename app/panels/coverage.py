"""The inspector's Coverage tab: which parts of the corpus the answers so far read, per document and
along the context, and the regions no answer read, each a click away from the source viewer.

Computed by app/analysis.py (coverage) through the inspector's view-model (app/inspector_view.py)
from each turn's compact selection record; refreshed after every answer and corpus load. The
region chips carry 'file:<name>:<first>-<last>' viewer targets, which app/bridge.js sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from runtime import figures as F
from .. import render as R
from . import Context

TITLE = "Coverage"
TABLE_MAX_HEIGHT = 420  # px: the documents table scrolls within this


@dataclass
class CoveragePanel:
    summary: gr.HTML
    strip: gr.Plot
    table: gr.HTML

    @property
    def outputs(self) -> list:
        return [self.summary, self.strip, self.table]

    def views(self, ws) -> dict:
        model = ws.inspector()
        cov = model.coverage()
        return {self.summary: R.coverage_summary(cov, len(ws.turns)), self.strip: model.coverage_figure(cov),
                self.table: R.coverage_table(cov)}


def build(ctx: Context) -> CoveragePanel:
    with gr.Tab(TITLE, id="coverage", elem_id="ll-tab-coverage"):
        gr.HTML('<div class="ll-muted">Over the whole conversation: the share of each document\'s compressed '
                'entries that some answer\'s sparse attention picked, the attention each received, and the '
                'stretches no answer read (click one to open it).</div>')
        summary = gr.HTML(R.placeholder("Load a corpus and ask questions: this view shows which parts of it the "
                                        "answers read."), elem_id="ll-coverage-summary")
        strip = gr.Plot(F.coverage_strip([], 0), show_label=False, elem_id="ll-coverage-strip")
        table = gr.HTML("", elem_id="ll-coverage", max_height=TABLE_MAX_HEIGHT)
    return CoveragePanel(summary, strip, table)


def wire(ctx: Context, panel: CoveragePanel, inspector) -> None:
    """Nothing of its own: its region and document clicks reach the viewer through the page's bridge."""


__all__ = ["CoveragePanel", "TITLE", "build", "wire"]
