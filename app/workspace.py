"""One user's workspace: a runtime `Session` plus what the UI shows about it (no gradio here).

The session (cache, corpus layout, conversation) is the heavy part; it can be spilled to a
snapshot and dropped by the registry (app/sessions.py) and reloaded on the next model job. What
the views need -- the corpus layout, the turns with their sources, the last answer's provenance,
the memory figures -- stays here, so the page keeps working while the session is on disk.

Model jobs (`load_corpus`, `load_snapshot`, `ask`, `retry`, `clear`) run only inside
`Registry.use`, one at a time per user; views (`doc_rows`, `inspector()`: the inspector's
view-model, app/inspector_view.py) only read plain data and may run at any time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import runtime
from runtime import Answer, GenerationParams, LonglensError, Piece

from .errors import AppError, InputError, code_of, explain
from . import analysis
from .inspector_view import Inspector, LineCache, Shape, SourceView
from .sessions import large_allocations


@dataclass
class TurnView:
    """One question and its answer as the chat shows it."""
    question: str
    answer: str = ""
    stop_reason: str = ""  # eos, max_new_tokens, stopped, context_full; "" while streaming
    sources: list = field(default_factory=list)  # runtime Source, heaviest first
    timings: dict = field(default_factory=dict)
    note: str = ""  # an error or a remark shown under the answer
    provenance: object | None = None  # runtime Provenance; kept for the last turn only
    summary: object | None = None  # app.analysis.TurnSummary: its CSA selection, compact (coverage, compare)


def unique_names(names: Sequence[str]) -> list[str]:
    """Display names made unique: 'a.txt', 'a.txt (2)', ..."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen[n] = seen.get(n, 0) + 1
        out.append(n if k == 1 else f"{n} ({k})")
    return out


def build_corpus(uploads: Sequence[tuple[str, str]], max_file_bytes: int, max_files: int):
    """Ingest uploaded files (path on the server, name the user knows it by) into one corpus whose
    documents are named after what the user uploaded, never after the server's temp paths."""
    Limits, ingest, CorpusError = runtime.Limits, runtime.ingest, runtime.CorpusError
    if not uploads:
        raise InputError("no files given: drop text, code, PDF or archive files onto the upload area")
    default = Limits()
    limits = Limits(max_file_bytes=max_file_bytes, max_files=max_files,
                    max_total_bytes=max(default.max_total_bytes, max_file_bytes))
    paths = [str(p) for p, _ in uploads]
    names = unique_names([n for _, n in uploads])
    try:
        corpus = ingest(paths, limits)
    except CorpusError as e:
        raise InputError(_rename(str(e), paths, names)) from None
    docs = [dataclasses.replace(d, name=_rename(d.name, paths, names)) for d in corpus.documents]
    skipped = [dataclasses.replace(s, name=_rename(s.name, paths, names)) for s in corpus.skipped]
    return dataclasses.replace(corpus, documents=docs, skipped=skipped)


def _rename(text: str, paths: list[str], names: list[str]) -> str:
    for p, n in sorted(zip(paths, names), key=lambda pn: -len(pn[0])):
        text = text.replace(p, n)
    return text


class Workspace:
    def __init__(self, key: str, engine, settings, files=None):
        self.key, self.engine, self.settings = key, engine, settings
        self.files = files  # app.sessions.SessionFiles: private uploads, session snapshots (None: neither)
        self.moved: dict[str, str] = {}  # upload path -> where it was moved once read
        self._taken = 0
        self.session = None  # runtime Session while resident
        self.spilled: Path | None = None  # snapshot holding the session while evicted
        self.busy = ""  # what runs now ("" idle); set by the registry
        self.last_used = 0.0
        self.release_when_idle = False
        self.stop_event = threading.Event()
        self.layout = None  # the corpus Layout (kept while spilled, for views)
        self.offset = 0  # context position of layout token 0
        self.docs: list[tuple[str, int, int]] = []
        self.turns: list[TurnView] = []
        self.focus = None  # what the inspector shows: an answer token, a span (first, last); None: the whole answer
        self.report = None  # the last runtime LoadReport
        self.n_tokens = 0
        self.cache_bytes: dict[str, int] = {}
        self.dense_bytes = 0
        self.own_snapshots: list[str] = []
        self.notice = ""  # shown once with the next status (e.g. a spill that could not be saved)
        self._lines = LineCache()  # documents split into lines, for the source viewer
        self.corpus = None  # the ingested runtime Corpus (None after a snapshot load: rebuilt from the layout)
        self.info: dict = {}  # runtime.trace.session_info of the corpus: model name, fingerprints, index_topk
        self.target = ""  # the viewer target the user opened last ('src:..', 'cell:..', 'file:..'): counterfactual
        self.loaded = None  # a trace read from a file: (runtime Trace, its Provenance), shown until the next answer
        self.counterfactual_result = None  # the last runtime Counterfactual (its two answers' provenances)
        self.needles = None  # the last runtime NeedleGrid

    # ------------------------------------------------------------------------------------ residency
    @property
    def resident(self) -> bool:
        return self.session is not None

    def spill(self, folder: Path) -> None:
        """Save the session under `folder` and drop it from memory (called by the registry)."""
        s, self.spilled = self.session, None
        if s is None:
            return
        if s.n_tokens > 0:
            try:
                shutil.rmtree(folder, ignore_errors=True)
                self.spilled = s.save_snapshot(folder)
            except (LonglensError, OSError) as e:
                self.notice = (f"Memory was needed for other users and your session could not be saved ({e}); "
                               "load your files again.")
                self._forget_corpus()
        self.session = None

    def unspill(self) -> None:
        """Make the session resident again: a fresh one, or the spilled snapshot reloaded."""
        if self.engine is None:
            raise AppError("no model is loaded", code="no_model")
        session = self.engine.new_session()
        if self.spilled is not None:
            path, self.spilled = self.spilled, None
            try:
                session.load_snapshot(path)
            except (LonglensError, OSError) as e:
                self.notice = f"Your session could not be restored from disk ({e}); load your files again."
                self._forget_corpus()
            finally:
                shutil.rmtree(path.parent, ignore_errors=True)
        self.session = session

    def close(self) -> None:
        self.stop_event.set()
        self.session = None
        self._lines.clear()
        if self.files is not None:  # the session ended: its uploads and its own snapshots go
            self.files.drop(self.key)
        self.moved.clear()

    # ------------------------------------------------------------------------------------ corpus
    def load_corpus(self, uploads: Sequence[tuple[str, str]], progress: Callable | None = None,
                    snapshot_dir: str | Path | None = None, take_from: str | Path | None = None):
        """Ingest and prefill (or reuse a snapshot of) the uploaded files; returns the LoadReport.
        Raises InputError / a runtime LonglensError (ContextTooLarge, ...) with the session as it was, except
        when the prefill had begun (stopped, or a failure such as out of memory): the session is then
        left empty rather than holding part of the new corpus.

        `snapshot_dir`: where the prefill is saved and looked up (default: settings.snapshot_dir).
        `take_from`: gradio's upload folder: files under it are moved into this session's private
        folder once read (also when unusable), and found there when the same upload comes again."""
        given = [str(p) for p, _ in uploads]
        resolved = [(p if os.path.exists(p) else self.moved.get(p, p), n) for p, (_, n) in zip(given, uploads)]
        try:
            corpus = build_corpus(resolved, self.settings.max_file_bytes, self.settings.max_files)
        finally:
            if take_from is not None:
                self._take(given, take_from)
        self.stop_event.clear()
        try:
            with large_allocations():
                report = self.session.load_corpus(corpus, progress=progress, stop=self.stop_event,
                                                  snapshot_dir=snapshot_dir or self.settings.snapshot_dir)
        except Exception:
            if self.session.layout is not self.layout:  # the prefill had begun: the session holds a part at most
                self.session = self.engine.new_session()
                self._forget_corpus()
            raise
        self._adopt(report)
        self.corpus = corpus
        return report

    def _take(self, paths: Sequence[str], root: str | Path) -> None:
        """Move the files under `root` among `paths` out of it, into this session's private folder
        (or delete them when there is none): gradio serves its upload folder to anyone holding a
        file's URL, and the files were read already."""
        root = Path(root).resolve()
        for p in paths:
            src = Path(p)
            try:
                if not src.is_file() or src.is_symlink() or not src.resolve().is_relative_to(root):
                    continue
                if self.files is None:
                    src.unlink()
                else:
                    self._taken += 1
                    dest = self.files.uploads(self.key) / str(self._taken) / src.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(src, dest)
                    old = self.moved.get(p)
                    self.moved[p] = str(dest)
                    if old and old != str(dest):
                        shutil.rmtree(Path(old).parent, ignore_errors=True)
            except OSError:
                try:
                    src.unlink()  # never leave it served
                except OSError:
                    pass
            try:
                src.parent.rmdir()  # gradio's per-upload folder, now empty
            except OSError:
                pass

    def load_snapshot(self, path: str):
        try:
            report = self.session.load_snapshot(path)
        except Exception:
            if self.session.layout is not self.layout:
                self.session = self.engine.new_session()
                self._forget_corpus()
            raise
        self._adopt(report)
        self.turns = [TurnView(t.question, t.answer, t.stop_reason) for t in self.session.history]
        return report

    def _adopt(self, report) -> None:
        s = self.session
        self.report, self.layout, self.offset, self.docs = report, s.layout, s.offset, s.docs()
        self.turns, self.focus = [], None
        self.corpus, self.target, self.loaded, self.counterfactual_result, self.needles = None, "", None, None, None
        self.info = runtime.session_info(s) if s.layout is not None else {}
        self._lines.clear()
        if report.snapshot is not None:
            if str(report.snapshot) not in self.own_snapshots:
                self.own_snapshots.append(str(report.snapshot))
            if self.files is not None:
                self.files.hold(self.key, report.snapshot)
        self.refresh_memory()

    def _forget_corpus(self) -> None:
        self.layout, self.docs, self.turns, self.focus, self.report = None, [], [], None, None
        self.corpus, self.info, self.target, self.loaded, self.counterfactual_result = None, {}, "", None, None
        self._lines.clear()
        self.n_tokens, self.cache_bytes, self.dense_bytes = 0, {}, 0

    def refresh_memory(self) -> None:
        s = self.session
        self.n_tokens = s.n_tokens
        self.cache_bytes = {k: v for k, v in s.cache_bytes().items() if k != "total"}
        self.dense_bytes = s.dense_cache_bytes()

    def doc_rows(self) -> list[tuple[str, int, float, int]]:
        """(name, tokens, share of the corpus, cache bytes) per document."""
        per_token = self.engine.cache_bytes_per_token() if self.engine is not None else 0.0
        total = sum(e - s for _, s, e in self.docs) or 1
        return [(n, e - s, (e - s) / total, int(per_token * (e - s))) for n, s, e in self.docs]

    # ------------------------------------------------------------------------------------ chat
    def ask(self, question: str, params: GenerationParams, note: str = "") -> Iterator[TurnView]:
        """Stream one turn: the TurnView, updated after every piece, then finished."""
        turn = TurnView(question.strip(), note=note)
        self.turns.append(turn)
        self.loaded = self.counterfactual_result = None  # the inspector follows the new answer
        self.stop_event.clear()
        try:
            for item in self.session.ask(turn.question, params, stop=self.stop_event):
                if isinstance(item, Piece):
                    turn.answer += item.text
                elif isinstance(item, Answer):
                    turn.answer, turn.stop_reason, turn.timings = item.text, item.stop_reason, item.timings
                    turn.provenance = item.provenance
                    turn.summary = analysis.summarize(item.provenance)
                    turn.sources = list(item.provenance.sources) if item.provenance is not None else []
                yield turn
        except Exception as e:
            if code_of(e) is None:  # the model failed (e.g. out of memory): say so under the turn, then raise
                turn.note = f"The model failed ({type(e).__name__}: {e}); press Clear chat to go on with your corpus."
                turn.stop_reason = "error"
                yield turn
                raise
            turn.note = explain(e).text()  # a request it could not serve: what to do instead
            turn.stop_reason = turn.stop_reason or "error"
            yield turn
        finally:
            for older in self.turns[:-1]:
                older.provenance = None  # only the last answer is inspected token by token; keep memory flat
            self._bound_summaries()
            self.focus = None
            self.refresh_memory()

    def _bound_summaries(self) -> None:
        """Earlier answers keep their compact selection (coverage, compare) within analysis.SUMMARY_BYTES;
        beyond it the oldest are dropped."""
        kept = [t for t in self.turns if t.summary is not None]
        for t in kept[:analysis.within_budget([t.summary.nbytes for t in kept], analysis.SUMMARY_BYTES)]:
            t.summary = None

    def retry(self, params: GenerationParams) -> Iterator[TurnView]:
        """Answer the last question again: the cache rewinds to just before it (earlier turns stay). After
        a snapshot reload the turns cannot be undone one by one: then it rewinds to the corpus end."""
        if not self.turns:
            raise InputError("nothing to retry yet: ask a question first", code="nothing_to_undo")
        question, note = self.turns[-1].question, ""
        if self.session.can_undo():
            self.session.undo_turn()
            self.turns.pop()
        else:
            dropped = len(self.turns) - 1
            self.session.reset_chat()
            self.turns = []
            note = (f"Retried from the end of the corpus: the {dropped} earlier turn{'s' if dropped > 1 else ''} "
                    "left the model's context." if dropped else "")
        yield from self.ask(question, params, note)

    def clear(self) -> None:
        """Forget the conversation, keep the corpus (no prefill: the cache rewinds)."""
        self.session.reset_chat()
        self.turns, self.focus, self.loaded, self.counterfactual_result = [], None, None, None
        self.refresh_memory()

    # ------------------------------------------------------------------------------------ inspector
    @property
    def provenance(self):
        """What the Selection tab shows: a loaded trace's provenance, else the last answer's."""
        if self.loaded is not None:
            return self.loaded[1]
        return self.turns[-1].provenance if self.turns else None

    # ------------------------------------------------------------------------------------ views of issue 22
    def counterfactual(self, exclude: Sequence = (), include: Sequence = (), index_topk: int | None = None,
                       params: GenerationParams | None = None):
        """The last answer again with `exclude` / `include` (line specs or (start, end) context tokens) forced
        out of / into every CSA layer's top-k, or another index_topk, from the cache mark before it (no
        prefill); the session is exactly as before afterwards. Returns the runtime Counterfactual."""
        if not self.turns:
            raise InputError("ask a question first: a counterfactual answers it again", code="nothing_to_undo")
        steering = self.session.steering(exclude=list(exclude), include=list(include), index_topk=index_topk)
        self.stop_event.clear()
        self.counterfactual_result = self.session.counterfactual(steering, params, stop=self.stop_event)
        return self.counterfactual_result

    def corpus_for_probe(self):
        """The loaded corpus as a runtime Corpus (rebuilt from the layout's texts after a snapshot load)."""
        if self.layout is None:
            raise InputError("load a corpus first: the needles are planted into your documents", code="input")
        if self.corpus is not None:
            return self.corpus
        return runtime.Corpus([runtime.Document(d.name, text, "text") for d, text in zip(self.layout.documents, self.layout.texts)])

    def needle_grid(self, depths: Sequence[float], documents: Sequence[str] | None, per_context: str, seed: int,
                    progress: Callable | None = None):
        """Plant needles into a copy of the corpus (in memory; the files stay), ask for each (a session of its
        own: a second cache while it runs) and keep the runtime NeedleGrid."""
        corpus = self.corpus_for_probe()
        self.stop_event.clear()
        self.needles = runtime.needle_grid(self.engine, corpus, depths=list(depths),
                                                 documents=list(documents) if documents else None, seed=int(seed),
                                                 per_context=per_context, progress=progress, stop=self.stop_event)
        return self.needles

    def load_trace(self, path: str | Path) -> object:
        """Show a trace file (a Longlens JSON, an HTML report or an SGLang response) over this corpus in the
        Selection tab. Raises a runtime TraceError (or InputError) with the workspace as it was."""
        if self.layout is None:
            raise InputError("load the corpus the trace was made over first", code="input")
        cfg = self.engine.config if self.engine is not None else None
        trace = runtime.read_trace(path, config=cfg, documents=self.docs, offset=self.offset,
                           tokenizer=getattr(self.engine, "tokenizer", None))
        problems = trace.mismatches(self.info.get("model", ""), self.info.get("tokenizer", ""))
        if problems:
            raise InputError("; ".join(problems) + ": its positions would not line up with this model", code="input")
        prov = trace.to_provenance(self.layout, self.offset, config=cfg)
        self.loaded, self.focus = (trace, prov), None
        return trace

    def answer_trace(self):
        """The runtime Trace of what the Selection tab shows: a loaded trace, else the last answer."""
        if self.loaded is not None:
            return self.loaded[0]
        if not self.turns or self.turns[-1].provenance is None:
            raise InputError("nothing to export yet: ask a question first", code="input")
        t = self.turns[-1]
        return runtime.Trace.from_provenance(t.provenance, t.question, t.answer, stop_reason=t.stop_reason, **self.info)

    def inspector(self) -> Inspector:
        """The inspector's view-model over this workspace's data (app/inspector_view.py)."""
        return Inspector(self.layout, self.offset, self.provenance, [t.sources for t in self.turns],
                         Shape.of(self.engine.config if self.engine is not None else None), self.n_tokens, self._lines,
                         [t.summary for t in self.turns], [t.question for t in self.turns])


# InputError (app/errors.py) and SourceView (app/inspector_view.py) are re-exported for callers that knew them here
__all__ = ["InputError", "SourceView", "TurnView", "Workspace", "build_corpus", "unique_names"]
