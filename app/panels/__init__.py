"""The page's panels, each a module with `build(ctx) -> <Panel>` (its components, laid out where it is
called) and `wire(ctx, ...)` (its events): header.py, corpus.py, chat.py, inspector.py (whose tabs across
answers, coverage.py and compare.py, follow the same pattern inside it). app/ui.py composes them into one
gr.Blocks.

A panel's `views(...)` returns {component: value} for its outputs, so a job that refreshes several
panels merges their dicts (gradio takes a dict keyed by output components).

`Context` is what every panel's handlers share: the model, the settings and the users' workspaces.
Per-user state lives only in the registry, keyed by `request.session_hash`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from ..sessions import Registry, SessionFiles
from ..settings import Settings


@dataclass
class Context:
    engine: Any  # runtime Engine; None when no model could be loaded
    problem: str  # why there is no model ("" when there is one)
    settings: Settings
    registry: Registry  # session key -> app.workspace.Workspace
    files: SessionFiles  # users' uploads and session snapshots (private to this process)
    library: set[str] = field(default_factory=set)  # the server's saved corpora, listed to everyone

    @property
    def model_job(self) -> dict:
        """Event options of every job that runs the model: one queue of `settings.concurrency` slots."""
        return dict(concurrency_id="model", concurrency_limit=self.settings.concurrency)

    @staticmethod
    def key(request: gr.Request) -> str:
        return request.session_hash or "anonymous"

    def workspace(self, request: gr.Request):
        """This user's workspace, for views (not made resident: see Registry.peek)."""
        return self.registry.peek(self.key(request))


__all__ = ["Context"]
