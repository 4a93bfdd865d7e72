"""The Longlens page (gradio 6 Blocks), composed of its panels (app/panels/).

`build_demo(settings) -> (demo, launch_kwargs)`; launch.py queues and launches it. Top to bottom:
the header (which model), the corpus panel (uploads, prefill progress, documents, memory ledger,
snapshots) next to the chat (streaming answers and source chips), then the attention inspector.

Per-user state lives in a `Registry` of `Workspace`s keyed by `request.session_hash` (created
here, one per demo; nothing per-user in globals or gr.State). Every model job -- prefill,
snapshot load, answer, retry, clear -- runs with `concurrency_id="model"` so they share one
queue of `settings.concurrency` slots; gradio shows the queue position while a job waits. Stop
and cancel run unqueued so they act at once; views run in their own small queues.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from runtime import list_snapshots

from .panels import Context, chat, corpus, header, inspector
from .sessions import Registry, SessionFiles, give_back_memory, process_spill_dir
from .workspace import Workspace

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def load_engine(settings):
    """(engine, None) or (None, why): a missing model is shown in the page, not a crash."""
    from runtime import Engine

    try:
        engine = Engine.from_dir(settings.model_dir, dtype=settings.resolved_dtype(),
                                 device=settings.resolved_device(), chunk_size=settings.chunk_size,
                                 max_context_tokens=settings.max_context, index_dtype=settings.index_dtype,
                                 prefill_dtype=settings.prefill_dtype)
    except (ValueError, OSError) as e:  # EngineError, ConfigError, CheckpointError: all ValueErrors
        return None, f"{e}"
    engine.warm_up()  # the compiled decode step builds while the user picks files, not in the first answer
    return engine, None


def drop_page_state(demo, session_hash: str) -> None:
    """Forget gradio's per-page state of a session whose page has closed (nothing reads it again)."""
    holder = getattr(demo, "state_holder", None)
    if holder is None:
        return
    with holder.lock:
        state = holder.session_data.get(session_hash)
        if state is not None and getattr(state, "is_closed", True):
            del holder.session_data[session_hash]
            holder.time_last_used.pop(session_hash, None)
    if state is not None:
        give_back_memory()


def build_demo(settings):
    engine, problem = load_engine(settings)
    private = process_spill_dir(Path(settings.snapshot_dir) / ".sessions")  # this process's; never served
    files = SessionFiles(private)  # users' uploads and session snapshots, removed when the session ends
    registry = Registry(lambda key: Workspace(key, engine, settings, files), settings.max_sessions, private)
    library = {str(s.path) for s in list_snapshots(settings.snapshot_dir) if s.complete}  # present at start
    ctx = Context(engine, problem or "", settings, registry, files, library)

    with gr.Blocks(title="Longlens", delete_cache=(3600, 3 * 3600)) as demo:
        header.build(ctx)
        with gr.Row(equal_height=False, elem_id="ll-top"):
            corpus_panel = corpus.build(ctx)
            chat_panel = chat.build(ctx)
        inspector_panel = inspector.build(ctx)

        corpus.wire(ctx, corpus_panel, chat_panel, inspector_panel)
        chat.wire(ctx, chat_panel, corpus_panel, inspector_panel)
        inspector.wire(ctx, inspector_panel)

        def release(request: gr.Request):
            if demo.auth and not getattr(request, "username", None):
                return  # gradio's /heartbeat route skips the login check: a stranger must not end a session
            k = ctx.key(request)
            registry.peek(k).stop_event.set()
            registry.release(k)
            # gradio keeps the closed page's component values (plots included: MiBs) until its hourly sweep
            # or until state_session_capacity newer sessions push them out; drop them once this unload is done
            sid = getattr(request, "session_hash", None)
            if sid:
                drop_page_state(demo, sid)

        demo.unload(release)

    demo.longlens = SimpleNamespace(registry=registry, engine=engine, settings=settings, files=files)  # for tests
    css = (ASSETS / "style.css").read_text() if (ASSETS / "style.css").is_file() else ""
    theme = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate",  # system fonts: the page works offline
                           font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                           font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])
    # gradio keeps every session's copy of the page state (~0.3 MiB here), closed or not, up to
    # state_session_capacity sessions (10,000 by default: GBs on a public demo). Nothing here needs it
    # back (no gr.State; the dropdowns take custom values), so keep far fewer.
    capacity = max(64, 8 * settings.max_sessions)
    return demo, dict(theme=theme, css=css, state_session_capacity=capacity)


__all__ = ["build_demo", "drop_page_state", "load_engine"]
