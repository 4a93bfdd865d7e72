"""The corpus panel: uploads (files, folders, archives, the sample, snapshots), prefill progress,
the documents table, the KV cache ledger and the saved corpora.

Loading is a model job: it runs in a worker thread under `Registry.use` while the handler streams
its progress into the status; when it ends, every panel shows the new corpus (an empty chat, an
empty inspector). A failed load says why (app/errors.py) and which corpus is still loaded.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from runtime import list_snapshots

from .. import errors as E
from runtime import figures as F
from .. import render as R
from . import Context
from .header import SAMPLE_QUESTION

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
DOCS_MAX_HEIGHT = 300  # px: the documents table scrolls within this, whatever the corpus size


def upload_name(path: str) -> str:
    """The name a user knows an upload by: its base name (folder drops carry 'dir∕sub∕file')."""
    return Path(path).name.replace("\u2215", "/")


def ledger_figure(nbytes: dict, dense: int):
    """The cache ledger, laid out for the narrow corpus column."""
    fig = F.cache_ledger(nbytes, dense) if nbytes else F.cache_ledger({}, 0)
    if nbytes:
        fig.update_layout(height=310, margin=dict(l=110, r=20, t=60, b=40),
                          legend=dict(orientation="h", y=-0.3, x=0, font=dict(size=11)))
        fig.update_xaxes(title=None)  # the ticks carry the unit
    return fig


@dataclass
class CorpusPanel:
    files: gr.File
    sample: gr.Button
    folder: gr.UploadButton
    cancel: gr.Button
    status: gr.HTML
    summary: gr.HTML
    docs: gr.HTML
    ledger: gr.Plot
    snaps: gr.Dropdown
    snap_load: gr.Button
    snap_refresh: gr.Button

    @property
    def outputs(self) -> list:
        """What a view refresh updates, in the API's order (after the status)."""
        return [self.summary, self.docs, self.ledger, self.snaps]

    def snapshot_choices(self, ctx: Context, ws) -> list[tuple[str, str]]:
        """(label, path) of the snapshots this user may load: the server's library and their own."""
        allowed = ctx.library | set(ws.own_snapshots)
        found = list_snapshots(ctx.settings.snapshot_dir) + list_snapshots(ctx.files.corpora)
        return [(R.snapshot_label(s), str(s.path)) for s in sorted(found, key=lambda s: s.created, reverse=True)
                if s.complete and str(s.path) in allowed]

    def views(self, ctx: Context, ws) -> dict:
        limit, why = ctx.engine.context_limit() if ctx.engine else (0, "")
        corpus_tokens = sum(e - s for _, s, e in ws.docs)
        snaps = self.snapshot_choices(ctx, ws)
        return {self.summary: R.corpus_summary(len(ws.docs), corpus_tokens, ws.n_tokens, limit, why),
                self.docs: R.doc_table(ws.doc_rows()),
                self.ledger: ledger_figure(ws.cache_bytes, ws.dense_bytes),
                self.snaps: gr.update(choices=snaps, value=snaps[0][1] if snaps else None)}


def build(ctx: Context) -> CorpusPanel:
    settings, engine = ctx.settings, ctx.engine
    upload_note = f"≤ {F.format_bytes(settings.max_file_bytes)} each"
    context = (*engine.context_limit(), engine.reserve_tokens()) if engine else None
    with gr.Column(scale=5, min_width=360, elem_classes="ll-panel", elem_id="ll-corpus"):
        gr.HTML('<div class="ll-h">Corpus</div>')
        files = gr.File(file_count="multiple", label=f"Files, folders or zip/tar archives · {upload_note}",
                        elem_id="ll-drop", height=150)
        with gr.Row(elem_classes="ll-buttons"):
            sample = gr.Button("Try the sample corpus", size="sm", elem_id="ll-sample")
            folder = gr.UploadButton("Upload a folder…", file_count="directory", size="sm")
            cancel = gr.Button("Stop prefill", size="sm", variant="stop")
        first = (R.status("info", "Drop some files to begin", [
            "Text, Markdown, code, CSV/JSON, HTML and PDF; zip and tar archives are unpacked.",
            f"Up to {F.format_bytes(settings.max_file_bytes)} per file and {settings.max_files:,} files."])
            if engine else R.status("error", "No model is loaded", [ctx.problem]))
        status = gr.HTML(first, elem_id="ll-status")
        gr.HTML(R.limits(settings.max_file_bytes, settings.max_files, context, settings.max_sessions),
                elem_id="ll-limits")
        summary = gr.HTML(R.corpus_summary(0, 0, 0, 0, ""), elem_id="ll-summary")
        docs = gr.HTML("", elem_id="ll-docs", max_height=DOCS_MAX_HEIGHT)
        ledger = gr.Plot(ledger_figure({}, 0), show_label=False, elem_id="ll-ledger")
        with gr.Accordion("Snapshots", open=False):
            gr.HTML('<div class="ll-muted">A prefilled corpus is saved and reused when the same files come '
                    'again. Listed: the server\'s saved corpora and this session\'s.</div>')
            snaps = gr.Dropdown(choices=[], label="Saved corpora", interactive=True, allow_custom_value=True)
            with gr.Row():
                snap_load = gr.Button("Load snapshot", size="sm")
                snap_refresh = gr.Button("Refresh list", size="sm")
    return CorpusPanel(files, sample, folder, cancel, status, summary, docs, ledger, snaps, snap_load, snap_refresh)


def wire(ctx: Context, corpus: CorpusPanel, chat, inspector) -> None:
    """Load jobs refresh the whole page: the status, the corpus, the (new, empty) chat, the inspector."""
    registry, engine = ctx.registry, ctx.engine

    def run_load(request: gr.Request, job, n_files: int, stage: str):
        """Run `job(ws, progress_callback)` as a model job, streaming progress into the status."""
        status = corpus.status
        if engine is None:
            yield {status: R.status("error", "No model is loaded", [ctx.problem])}
            return
        k = ctx.key(request)
        yield {status: R.starting(n_files) if n_files else R.status("info", f"{stage}…")}
        updates: queue.Queue = queue.Queue()
        result: dict = {}

        def work():
            try:
                with registry.use(k, stage.lower()) as ws:
                    result["report"] = job(ws, updates.put)
            except Exception as e:  # keep the page alive; an uncoded error is named by its class
                result["error"] = e if E.code_of(e) or isinstance(e, OSError) else RuntimeError(
                    f"{type(e).__name__}: {e}")
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
            why = E.explain(err, fallback="Loading failed")
            kept = "The previous corpus is still loaded." if ws.docs else "No corpus is loaded."
            lines = [why.message] + ([why.hint] if why.hint else []) + [kept]
            # the views too: a prefill that failed midway leaves no corpus, and the page must not show one
            yield {status: R.status(why.kind, why.title, lines), **corpus.views(ctx, ws), **chat.views(ws)}
            return
        yield {status: R.status(*loaded(result["report"], ws)), **corpus.views(ctx, ws), **chat.views(ws),
               **inspector.reset(ws)}

    def load_files(files, request: gr.Request):
        files = [f for f in (files or []) if f]
        if not files:
            yield {corpus.status: R.status("info", "No files in the upload area",
                                           ["The loaded corpus stays; drop files to replace it."])}
            return
        uploads = [(str(f), upload_name(str(f))) for f in files]
        # users' files: prefill snapshots stay private to live sessions; the uploads leave gradio's served folder
        job = lambda ws, cb: ws.load_corpus(uploads, cb, snapshot_dir=ctx.files.corpora,  # noqa: E731
                                            take_from=gr.utils.get_upload_folder())
        yield from run_load(request, job, len(uploads), "Loading the corpus")

    def load_sample(request: gr.Request):
        paths = sorted(p for p in EXAMPLES.iterdir() if p.is_file() and not p.name.startswith("."))
        uploads = [(str(p), f"examples/{p.name}") for p in paths]
        yield from run_load(request, lambda ws, cb: ws.load_corpus(uploads, cb), len(uploads), "Loading the sample")

    def load_snapshot(choice, request: gr.Request):
        ws = ctx.workspace(request)
        if not choice or choice not in ctx.library | set(ws.own_snapshots):
            yield {corpus.status: R.status("warn", "Pick a snapshot from the list first")}
            return
        yield from run_load(request, lambda ws, cb: ws.load_snapshot(choice), 0, "Loading the snapshot")

    def refresh_snapshots(request: gr.Request):
        snaps = corpus.snapshot_choices(ctx, ctx.workspace(request))
        return gr.update(choices=snaps, value=snaps[0][1] if snaps else None)

    def stop(request: gr.Request):
        ctx.workspace(request).stop_event.set()

    outputs = [corpus.status, *corpus.outputs, *chat.outputs, *inspector.outputs]
    load = dict(outputs=outputs, show_progress="minimal", **ctx.model_job)
    corpus.files.upload(load_files, corpus.files, api_name="load_files", **load)
    corpus.files.delete(load_files, corpus.files, api_name=False, **load)  # a file removed: the rest, prefilled again
    corpus.folder.upload(load_files, corpus.folder, api_name="load_folder", **load)
    corpus.sample.click(load_sample, None, api_name="load_sample", **load).then(
        lambda: SAMPLE_QUESTION, None, chat.question, queue=False, api_visibility="private")
    corpus.snap_load.click(load_snapshot, corpus.snaps, api_name="load_snapshot", **load)
    corpus.snap_refresh.click(refresh_snapshots, None, corpus.snaps, api_name="list_snapshots", queue=False)
    corpus.cancel.click(stop, None, None, queue=False, api_name="cancel_prefill")


def loaded(report, ws) -> tuple[str, str, list[str]]:
    """(status kind, title, lines) for a finished load (a runtime LoadReport)."""
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
    return kind, "Corpus ready — ask a question", details


__all__ = ["CorpusPanel", "build", "ledger_figure", "loaded", "upload_name", "wire"]
