"""The Longlens page: layout and event wiring (gradio 6 Blocks).

`build_demo(settings) -> (demo, launch_kwargs)`; launch.py queues and launches it. Panels, top to
bottom: the header (which model), the corpus (uploads, prefill progress, documents, memory
ledger, snapshots) next to the chat (streaming answers and source chips), then the attention
inspector (CSA selection heatmap, source viewer, attention mass, HCA weights, compression
boundary).

Per-user state lives in a `Registry` of `Workspace`s keyed by `request.session_hash` (created
here, one per demo; nothing per-user in globals or gr.State). Every model job -- prefill,
snapshot load, answer, retry, clear -- runs with `concurrency_id="model"` so they share one
queue of `settings.concurrency` slots; gradio shows the queue position while a job waits. Stop
and cancel run unqueued so they act at once; views run in their own small queues.
"""

from __future__ import annotations

import queue
import threading
from html import escape
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from runtime import EngineError, GenerationParams, list_snapshots

from . import figures as F
from . import render as R
from .sessions import Busy, Registry, SessionFiles, give_back_memory, process_spill_dir
from .workspace import HEAT_COLUMNS, InputError, Workspace

APP_DIR = Path(__file__).resolve().parent
ASSETS = APP_DIR.parent / "assets"
EXAMPLES = ASSETS / "examples"
SAMPLE_QUESTION = "What is the access code for the misty lighthouse?"
WHOLE = "all"


# ------------------------------------------------------------------------------------ the model
def load_engine(settings):
    """(engine, None) or (None, why): a missing model is shown in the page, not a crash."""
    from runtime import Engine

    try:
        engine = Engine.from_dir(settings.model_dir, dtype=settings.resolved_dtype(),
                                 device=settings.resolved_device(), chunk_size=settings.chunk_size,
                                 max_context_tokens=settings.max_context)
    except (EngineError, OSError, ValueError) as e:
        return None, f"{e}"
    return engine, None


def describe_model(engine, settings) -> tuple[str, str]:
    """(one line about the model, a note on what it is good for)."""
    if engine is None:
        return f"Model folder: {settings.model_dir}", ""
    cfg = engine.config
    params = sum(p.numel() for p in engine.model.parameters())
    kinds = {"sliding_attention": "SWA", "compressed_sparse_attention": f"CSA {cfg.csa_rate}:1 top-{cfg.index_topk}",
             "heavily_compressed_attention": f"HCA {cfg.hca_rate}:1"}
    layers = " · ".join(kinds.get(t, t) for t in cfg.layer_types)
    limit, _ = engine.context_limit()
    dtype = str(engine.model.dtype).replace("torch.", "")
    line = (f"{model_name(settings.model_dir)} · {params / 1e6:.1f}M parameters · {cfg.num_hidden_layers} layers "
            f"[{layers}] · window {cfg.sliding_window} · context {limit:,} tokens · "
            f"{engine.model.device.type.upper()} {dtype}")
    if settings.is_shipped_model():
        note = ("This small model was trained here to find facts planted in long inputs: it is a retrieval "
                "demonstrator, not a chat assistant. Ask for something your files state (try the sample and "
                f"“{SAMPLE_QUESTION}”) and see which blocks its sparse attention picked.")
    else:
        note = "Answers stream from this model; the inspector shows which compressed blocks it attended to."
    return line, note


def model_name(model_dir) -> str:
    """The model card's title ('# name' on its first line), else the folder's name."""
    card = Path(model_dir) / "MODEL_CARD.md"
    try:
        first = card.read_text(encoding="utf-8").lstrip().splitlines()[0]
        if first.startswith("# "):
            return first[2:].strip()[:80]
    except (OSError, IndexError, UnicodeDecodeError):
        pass
    return Path(model_dir).name


def upload_name(path: str) -> str:
    """The name a user knows an upload by: its base name (folder drops carry 'dir∕sub∕file')."""
    return Path(path).name.replace("\u2215", "/")


def ledger_figure(nbytes: dict, dense: int):
    """The cache ledger, laid out for the narrow corpus column."""
    fig = F.cache_ledger(nbytes, dense) if nbytes else F.cache_ledger({}, 0)
    if nbytes:
        fig.update_layout(height=310, margin=dict(l=110, r=20, t=60, b=40),
                          legend=dict(orientation="h", y=-0.3, x=0, font=dict(size=11)))
        fig.update_xaxes(title=None)
    return fig


# ------------------------------------------------------------------------------------ the page
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
    files_of = SessionFiles(private)  # users' uploads and session snapshots, removed when the session ends
    registry = Registry(lambda key: Workspace(key, engine, settings, files_of), settings.max_sessions, private)
    library = {str(s.path) for s in list_snapshots(settings.snapshot_dir) if s.complete}  # present at start
    model_line, model_note = describe_model(engine, settings)
    model_job = dict(concurrency_id="model", concurrency_limit=settings.concurrency)  # one queue for the model
    cfg = engine.config if engine is not None else None

    def key(request: gr.Request) -> str:
        return request.session_hash or "anonymous"

    # ---------------------------------------------------------------- views (plain data -> outputs)
    def snapshot_choices(ws) -> list[tuple[str, str]]:
        allowed = library | set(ws.own_snapshots)
        found = list_snapshots(settings.snapshot_dir) + list_snapshots(files_of.corpora)
        return [(R.snapshot_label(s), str(s.path)) for s in sorted(found, key=lambda s: s.created, reverse=True)
                if s.complete and str(s.path) in allowed]

    def corpus_view(ws) -> tuple:
        limit, why = engine.context_limit() if engine else (0, "")
        corpus_tokens = sum(e - s for _, s, e in ws.docs)
        ledger = ledger_figure(ws.cache_bytes, ws.dense_bytes)
        snaps = snapshot_choices(ws)
        return (R.corpus_summary(len(ws.docs), corpus_tokens, ws.n_tokens, limit, why), R.doc_table(ws.doc_rows()),
                ledger, gr.update(choices=snaps, value=snaps[0][1] if snaps else None))

    def focus_of(value) -> int | None:
        try:
            return None if value in (None, "", WHOLE) else int(value)
        except (TypeError, ValueError):
            return None

    def inspector_view(ws, focus: int | None, counts: bool) -> tuple:
        prov = ws.provenance
        ratios = {l: cfg.rate(l) for l in range(cfg.num_hidden_layers)} if cfg else {}
        boundary = F.compression_boundary(ws.n_tokens, cfg.sliding_window if cfg else 128, ratios)
        if prov is None:
            empty = F.selection_heatmap({}, 0)
            return empty, F.mass_split_bar({}), F.hca_weights({}, 0, rate=cfg.hca_rate if cfg else 128), boundary
        csa, hca = ws.selection(focus, counts)
        heat = F.selection_heatmap(csa, prov.n_context, prov.docs, ratio=cfg.csa_rate, locate=prov.describe,
                                   max_columns=HEAT_COLUMNS, value_label="times picked" if counts else "attention weight")
        if focus is not None:
            tok = prov.tokens[focus]
            heat.update_layout(title_text=f"CSA selection for answer token #{focus} {escape(repr(tok.text))}")
        hca_fig = F.hca_weights(hca, prov.n_context, prov.docs, rate=cfg.hca_rate)
        if focus is not None:
            hca_fig.update_layout(title_text=f"HCA: heaviest {cfg.hca_rate}-token summaries for answer token #{focus}")
        mass = F.mass_split_bar(prov.mass)
        if focus is not None:  # the capture keeps the split averaged over the answer only
            mass.update_layout(title_text="Where the attention mass went, per layer (whole answer)")
        return heat, mass, hca_fig, boundary

    def focus_choices(ws) -> list[tuple[str, str]]:
        prov = ws.provenance
        out = [("Whole answer", WHOLE)]
        if prov is not None:
            out += [(f"#{t.index} {t.text!r}", str(t.index)) for t in prov.tokens]
        return out

    def first_view(ws) -> str:
        """The viewer opened at the last answer's top source (or a hint)."""
        if ws.turns and ws.turns[-1].sources:
            try:
                return R.source_view(ws.source_target(f"src:{len(ws.turns) - 1}:0", ws.focus))
            except InputError as e:
                return R.placeholder(str(e))
        if ws.docs:
            return R.placeholder("Ask a question, then click a source chip or a heatmap cell to open the document "
                                 "at the lines the model attended to.")
        return R.placeholder("Load a corpus to browse its documents here.")

    def chat_view(ws) -> tuple:
        last = len(ws.turns) - 1
        return R.messages(ws.turns), R.chips(last, ws.turns[-1].sources) if ws.turns else ""

    # ---------------------------------------------------------------- corpus jobs
    def run_load(request: gr.Request, job, n_files: int, stage: str):
        """Run `job(ws, progress_callback)` as a model job, streaming progress into the status."""
        if engine is None:
            yield {status: R.status("error", "No model is loaded", [problem or ""])}
            return
        k = key(request)
        yield {status: R.starting(n_files) if n_files else R.status("info", f"{stage}…")}
        updates: queue.Queue = queue.Queue()
        result: dict = {}

        def work():
            try:
                with registry.use(k, stage.lower()) as ws:
                    result["report"] = job(ws, updates.put)
            except (InputError, EngineError, Busy, OSError) as e:
                result["error"] = e
            except Exception as e:  # keep the page alive; the message names the failure
                result["error"] = RuntimeError(f"{type(e).__name__}: {e}")
            finally:
                updates.put(None)

        threading.Thread(target=work, daemon=True, name=f"longlens-load-{k[:8]}").start()
        last, finished = 0.0, False
        try:
            while (p := updates.get()) is not None:
                if time.monotonic() - last > 0.25 or p.done == p.total:
                    last = time.monotonic()
                    yield {status: R.progress(p, "Prefilling")}
            finished = True
        finally:
            if not finished:  # the page went away mid-prefill: stop it, so the queue slot is really free
                registry.peek(k).stop_event.set()
        ws = registry.peek(k)
        err = result.get("error")
        if err is not None:
            kept = "The previous corpus is still loaded." if ws.docs else "No corpus is loaded."
            title, kind = {"ContextTooLarge": ("The corpus does not fit the context", "error"),
                           "InputError": ("These files cannot be used", "error"),
                           "Cancelled": ("Prefill stopped", "warn"),
                           "Busy": ("Busy", "warn")}.get(type(err).__name__, ("Loading failed", "error"))
            # the views too: a prefill that failed midway leaves no corpus, and the page must not show one
            yield {status: R.status(kind, title, [str(err), kept]),
                   **dict(zip(CORPUS_VIEWS, corpus_view(ws))), **dict(zip(CHAT_VIEWS, chat_view(ws)))}
            return
        report = result["report"]
        details = [f"{report.documents} document(s), {report.tokens:,} tokens in context"]
        t = report.timings
        if report.source == "snapshot":
            details.append(f"reused a snapshot: no prefill ({t.get('snapshot_load_s', 0):.1f} s)")
        elif t.get("prefill_s"):
            details.append(f"prefilled in {t['prefill_s']:.1f} s ({t.get('prefill_tokens_per_s', 0):,.0f} tokens/s)"
                           + (", snapshot saved" if report.snapshot else ""))
        skipped = R.skipped_lines(report.skipped)
        if skipped:
            details.append(f"skipped {len(report.skipped)} file(s):")
            details += skipped
        details += list(report.warnings)
        if ws.notice:
            details.append(ws.notice)
            ws.notice = ""
        kind = "warn" if report.skipped or report.warnings else "ok"
        yield {status: R.status(kind, "Corpus ready — ask a question", details),
               **dict(zip(CORPUS_VIEWS, corpus_view(ws))), **dict(zip(CHAT_VIEWS, chat_view(ws))),
               **dict(zip(INSPECTOR_PLOTS, inspector_view(ws, None, False))),
               focus: gr.update(choices=focus_choices(ws), value=WHOLE), viewer: first_view(ws)}

    def load_files(files, request: gr.Request):
        files = [f for f in (files or []) if f]
        if not files:
            yield {status: R.status("info", "No files in the upload area",
                                    ["The loaded corpus stays; drop files to replace it."])}
            return
        uploads = [(str(f), upload_name(str(f))) for f in files]
        # users' files: prefill snapshots stay private to live sessions; the uploads leave gradio's served folder
        job = lambda ws, cb: ws.load_corpus(uploads, cb, snapshot_dir=files_of.corpora,  # noqa: E731
                                            take_from=gr.utils.get_upload_folder())
        yield from run_load(request, job, len(uploads), "Loading the corpus")

    def load_sample(request: gr.Request):
        paths = sorted(p for p in EXAMPLES.iterdir() if p.is_file() and not p.name.startswith("."))
        uploads = [(str(p), f"examples/{p.name}") for p in paths]
        yield from run_load(request, lambda ws, cb: ws.load_corpus(uploads, cb), len(uploads), "Loading the sample")

    def load_snapshot(choice, request: gr.Request):
        ws = registry.peek(key(request))
        if not choice or choice not in library | set(ws.own_snapshots):
            yield {status: R.status("warn", "Pick a snapshot from the list first")}
            return
        yield from run_load(request, lambda ws, cb: ws.load_snapshot(choice), 0, "Loading the snapshot")

    def refresh_snapshots(request: gr.Request):
        snaps = snapshot_choices(registry.peek(key(request)))
        return gr.update(choices=snaps, value=snaps[0][1] if snaps else None)

    def stop(request: gr.Request):
        registry.peek(key(request)).stop_event.set()

    # ---------------------------------------------------------------- chat jobs
    def params_of(max_new_tokens, temperature, seed) -> GenerationParams:
        seed = int(seed) if seed not in (None, "") and float(seed) >= 0 else None
        return GenerationParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature), seed=seed)

    def chat_job(request: gr.Request, run, busy_msg: str):
        """Stream (chatbot, chips, question) while `run(ws)` yields turns."""
        k = key(request)
        if engine is None:
            raise gr.Error(f"No model is loaded: {problem}")
        try:
            with registry.use(k, busy_msg) as ws:
                for _ in run(ws):
                    yield (*chat_view(ws), "")
        except Busy as e:
            gr.Warning(f"Your session is {e}")
            yield (*chat_view(registry.peek(k)), gr.update())
        except (EngineError, InputError) as e:
            gr.Warning(str(e).replace("call reset_chat()", "press Clear chat").replace("(reset_chat)", "(Clear chat)"))
            yield (*chat_view(registry.peek(k)), gr.update())
        except Exception as e:  # shown to this user only; the corpus stays (Clear chat resets a broken chat)
            raise gr.Error(f"The model failed ({type(e).__name__}: {e}). Your corpus is still loaded: "
                           "press Clear chat to continue.") from e

    def ask(question, max_new_tokens, temperature, seed, request: gr.Request):
        if not (question or "").strip():
            gr.Warning("Type a question first.")
            yield (*chat_view(registry.peek(key(request))), gr.update())
            return
        params = params_of(max_new_tokens, temperature, seed)
        yield from chat_job(request, lambda ws: ws.ask(question, params), "answering")

    def retry(max_new_tokens, temperature, seed, request: gr.Request):
        params = params_of(max_new_tokens, temperature, seed)
        yield from chat_job(request, lambda ws: ws.retry(params), "answering")

    def clear(request: gr.Request):
        def run(ws):
            ws.clear()
            yield None
        yield from chat_job(request, run, "clearing the chat")

    def after_answer(request: gr.Request):
        """The inspector for the new last answer: whole answer, default measure, top source."""
        ws = registry.peek(key(request))
        ws.focus = None
        return (gr.update(choices=focus_choices(ws), value=WHOLE), *inspector_view(ws, None, False),
                first_view(ws), *corpus_view(ws))

    # ---------------------------------------------------------------- inspector views
    def inspect(focus_value, measure, request: gr.Request):
        ws = registry.peek(key(request))
        ws.focus = focus_of(focus_value)
        if ws.provenance is None or (ws.focus is not None and ws.focus >= len(ws.provenance.tokens)):
            ws.focus = None
        return inspector_view(ws, ws.focus, measure == "times picked")

    def open_source(target, request: gr.Request):
        ws = registry.peek(key(request))
        try:
            return R.source_view(ws.source_target(str(target or ""), ws.focus))
        except InputError as e:
            return R.placeholder(str(e))

    def open_from_click(evt: gr.EventData, request: gr.Request):
        return open_source(getattr(evt, "ll_target", ""), request)

    def release(request: gr.Request):
        if demo.auth and not getattr(request, "username", None):
            return  # gradio's /heartbeat route skips the login check: a stranger must not end a session
        k = key(request)
        registry.peek(k).stop_event.set()
        registry.release(k)
        # gradio keeps the closed page's component values (plots included: MiBs) until its hourly sweep or
        # until state_session_capacity newer sessions push them out; drop them once this unload is done
        sid = getattr(request, "session_hash", None)
        if sid:
            drop_page_state(demo, sid)

    # ---------------------------------------------------------------- layout
    upload_note = f"≤ {F.format_bytes(settings.max_file_bytes)} each"
    context = (*engine.context_limit(), engine.reserve_tokens()) if engine else None
    with gr.Blocks(title="Longlens", delete_cache=(3600, 3 * 3600)) as demo:
        gr.HTML(R.header(model_line, model_note, problem or ""), elem_id="ll-header")
        with gr.Row(equal_height=False, elem_id="ll-top"):
            with gr.Column(scale=5, min_width=360, elem_classes="ll-panel"):
                gr.HTML('<div class="ll-h">Corpus</div>')
                files = gr.File(file_count="multiple", label=f"Files, folders or zip/tar archives · {upload_note}",
                                elem_id="ll-drop", height=150)
                with gr.Row(elem_classes="ll-buttons"):
                    sample_btn = gr.Button("Try the sample corpus", size="sm", elem_id="ll-sample")
                    folder_btn = gr.UploadButton("Upload a folder…", file_count="directory", size="sm")
                    cancel_btn = gr.Button("Stop prefill", size="sm", variant="stop")
                status = gr.HTML(R.status("info", "Drop some files to begin", [
                    "Text, Markdown, code, CSV/JSON, HTML and PDF; zip and tar archives are unpacked.",
                    f"Up to {F.format_bytes(settings.max_file_bytes)} per file and {settings.max_files:,} files."])
                                 if engine else R.status("error", "No model is loaded", [problem or ""]),
                                 elem_id="ll-status")
                gr.HTML(R.limits(settings.max_file_bytes, settings.max_files, context, settings.max_sessions),
                        elem_id="ll-limits")
                summary = gr.HTML(R.corpus_summary(0, 0, 0, 0, ""), elem_id="ll-summary")
                docs = gr.HTML("", elem_id="ll-docs")
                ledger = gr.Plot(ledger_figure({}, 0), show_label=False, elem_id="ll-ledger")
                with gr.Accordion("Snapshots", open=False):
                    gr.HTML('<div class="ll-muted">A prefilled corpus is saved and reused when the same files come '
                            'again. Listed: the server\'s saved corpora and this session\'s.</div>')
                    snaps = gr.Dropdown(choices=[], label="Saved corpora", interactive=True, allow_custom_value=True)
                    with gr.Row():
                        snap_load = gr.Button("Load snapshot", size="sm")
                        snap_refresh = gr.Button("Refresh list", size="sm")
            with gr.Column(scale=7, min_width=420, elem_classes="ll-panel"):
                gr.HTML('<div class="ll-h">Chat</div>')
                chatbot = gr.Chatbot(height=520, elem_id="ll-chat", show_label=False, buttons=["copy"],
                                     placeholder="Answers stream here, with the lines of your files they came from.",
                                     feedback_options=None)
                chips = gr.HTML("", elem_id="ll-chips")
                with gr.Row(elem_classes="ll-ask"):
                    question = gr.Textbox(show_label=False, placeholder=f"Ask about your files, e.g. {SAMPLE_QUESTION}",
                                          scale=6, lines=1, max_lines=4, elem_id="ll-question")
                    ask_btn = gr.Button("Ask", variant="primary", scale=1, min_width=80, elem_id="ll-ask")
                with gr.Row(elem_classes="ll-buttons"):
                    stop_btn = gr.Button("Stop", size="sm", variant="stop", elem_id="ll-stop")
                    retry_btn = gr.Button("Retry", size="sm", elem_id="ll-retry")
                    clear_btn = gr.Button("Clear chat", size="sm", elem_id="ll-clear")
                with gr.Accordion("Generation settings", open=False):
                    with gr.Row():
                        max_new = gr.Slider(1, 512, value=48, step=1, label="max new tokens")
                        temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature (0: greedy)")
                        seed = gr.Number(value=-1, precision=0, label="seed (-1: random)")
        with gr.Column(elem_classes="ll-panel", elem_id="ll-inspector"):
            gr.HTML('<div class="ll-h">Attention inspector</div><div class="ll-muted">What the last answer attended '
                    'to, per layer. Click a heatmap cell or a source chip to open the document at those lines.</div>')
            with gr.Row():
                focus = gr.Dropdown(choices=[("Whole answer", WHOLE)], value=WHOLE, label="answer token",
                                    interactive=True, scale=3, elem_id="ll-focus", allow_custom_value=True)
                measure = gr.Radio(["attention weight", "times picked"], value="attention weight",
                                   label="heatmap value", scale=2)
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
        bridge = gr.HTML("", js_on_load=(APP_DIR / "bridge.js").read_text(), elem_id="ll-bridge")
        target = gr.Textbox(visible=False)
        open_btn = gr.Button(visible=False)

        CORPUS_VIEWS = (summary, docs, ledger, snaps)
        CHAT_VIEWS = (chatbot, chips)
        INSPECTOR_PLOTS = (heatmap, mass, hca, boundary)
        corpus_outputs = [status, *CORPUS_VIEWS, *CHAT_VIEWS, *INSPECTOR_PLOTS, focus, viewer]

        # ------------------------------------------------------------ wiring
        load = dict(outputs=corpus_outputs, show_progress="minimal", **model_job)
        files.upload(load_files, files, api_name="load_files", **load)
        files.delete(load_files, files, api_name=False, **load)  # a file removed: the rest, prefilled again
        folder_btn.upload(load_files, folder_btn, api_name="load_folder", **load)
        sample_btn.click(load_sample, None, api_name="load_sample", **load).then(
            lambda: SAMPLE_QUESTION, None, question, queue=False, api_visibility="private")
        snap_load.click(load_snapshot, snaps, api_name="load_snapshot", **load)
        snap_refresh.click(refresh_snapshots, None, snaps, api_name="list_snapshots", queue=False)
        cancel_btn.click(stop, None, None, queue=False, api_name="cancel_prefill")

        chat_out = [chatbot, chips, question]
        after = dict(fn=after_answer, inputs=None, outputs=[focus, *INSPECTOR_PLOTS, viewer, *CORPUS_VIEWS],
                     api_name=False, show_progress="hidden")
        gen = [max_new, temperature, seed]
        ask_btn.click(ask, [question, *gen], chat_out, api_name="ask", show_progress="minimal", **model_job).then(**after)
        question.submit(ask, [question, *gen], chat_out, api_name=False, show_progress="minimal",
                        **model_job).then(**after)
        retry_btn.click(retry, gen, chat_out, api_name="retry", show_progress="minimal", **model_job).then(**after)
        clear_btn.click(clear, None, chat_out, api_name="clear", **model_job).then(**after)
        stop_btn.click(stop, None, None, queue=False, api_name="stop")

        focus.input(inspect, [focus, measure], list(INSPECTOR_PLOTS), api_name="inspect", show_progress="minimal")
        measure.input(inspect, [focus, measure], list(INSPECTOR_PLOTS), api_name=False, show_progress="minimal")
        bridge.click(open_from_click, None, viewer, api_name=False, show_progress="hidden")
        open_btn.click(open_source, target, viewer, api_name="open_source")
        demo.unload(release)

    demo.longlens = SimpleNamespace(registry=registry, engine=engine, settings=settings, files=files_of)  # for tests
    css = (ASSETS / "style.css").read_text() if (ASSETS / "style.css").is_file() else ""
    theme = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate",  # system fonts: the page works offline
                           font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                           font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])
    # gradio keeps every session's copy of the page state (~0.3 MiB here), closed or not, up to
    # state_session_capacity sessions (10,000 by default: GBs on a public demo). Nothing here needs it
    # back (no gr.State; the dropdowns take custom values), so keep far fewer.
    capacity = max(64, 8 * settings.max_sessions)
    return demo, dict(theme=theme, css=css, state_session_capacity=capacity)


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
