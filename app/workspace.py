"""One user's workspace: a runtime `Session` plus what the UI shows about it (no gradio here).

The session (cache, corpus layout, conversation) is the heavy part; it can be spilled to a
snapshot and dropped by the registry (app/sessions.py) and reloaded on the next model job. What
the views need -- the corpus layout, the turns with their sources, the last answer's provenance,
the memory figures -- stays here, so the page keeps working while the session is on disk.

Model jobs (`load_corpus`, `load_snapshot`, `ask`, `retry`, `clear`) run only inside
`Registry.use`, one at a time per user; views (`doc_rows`, `selection`, `source_view`, ...) only
read plain data and may run at any time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

import runtime
from runtime import Answer, EngineError, GenerationParams, Piece, SnapshotError

from .figures import bin_positions
from .sessions import large_allocations

VIEW_LINES = 160  # most lines the source viewer shows around its target
HEAT_COLUMNS = 2000  # the heatmap's column cap (figures.selection_heatmap's max_columns)


class InputError(ValueError):
    """Unusable upload or corpus; the message says which file and why."""


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


@dataclass(frozen=True)
class SourceView:
    """A window of one document's lines for the source viewer; `heat` in [0, 1] per line shown."""
    name: str
    first_line: int  # 1-based number of lines[0]
    lines: list[str]
    heat: list[float]
    target: tuple[int, int]  # line range to mark and scroll to (0, 0: none)
    total_lines: int
    caption: str


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
        self.focus: int | None = None  # answer token the inspector shows; None: the whole answer
        self.report = None  # the last runtime LoadReport
        self.n_tokens = 0
        self.cache_bytes: dict[str, int] = {}
        self.dense_bytes = 0
        self.own_snapshots: list[str] = []
        self.notice = ""  # shown once with the next status (e.g. a spill that could not be saved)
        self._lines: dict[int, list[str]] = {}

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
            except (EngineError, SnapshotError, OSError) as e:
                self.notice = (f"Memory was needed for other users and your session could not be saved ({e}); "
                               "load your files again.")
                self._forget_corpus()
        self.session = None

    def unspill(self) -> None:
        """Make the session resident again: a fresh one, or the spilled snapshot reloaded."""
        if self.engine is None:
            raise EngineError("no model is loaded")
        session = self.engine.new_session()
        if self.spilled is not None:
            path, self.spilled = self.spilled, None
            try:
                session.load_snapshot(path)
            except (EngineError, SnapshotError, OSError) as e:
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
        Raises InputError / EngineError (ContextTooLarge, ...) with the session as it was, except
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
        self.turns, self.focus, self._lines = [], None, {}
        if report.snapshot is not None:
            if str(report.snapshot) not in self.own_snapshots:
                self.own_snapshots.append(str(report.snapshot))
            if self.files is not None:
                self.files.hold(self.key, report.snapshot)
        self.refresh_memory()

    def _forget_corpus(self) -> None:
        self.layout, self.docs, self.turns, self.focus, self.report, self._lines = None, [], [], None, None, {}
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
        self.stop_event.clear()
        try:
            for item in self.session.ask(turn.question, params, stop=self.stop_event):
                if isinstance(item, Piece):
                    turn.answer += item.text
                elif isinstance(item, Answer):
                    turn.answer, turn.stop_reason, turn.timings = item.text, item.stop_reason, item.timings
                    turn.provenance = item.provenance
                    turn.sources = list(item.provenance.sources) if item.provenance is not None else []
                yield turn
        except EngineError as e:
            turn.note = str(e).replace("call reset_chat()", "press Clear chat")
            turn.stop_reason = turn.stop_reason or "error"
            yield turn
        except Exception as e:  # the model failed (e.g. out of memory): say so under the turn, then raise
            turn.note = f"The model failed ({type(e).__name__}: {e}); press Clear chat to go on with your corpus."
            turn.stop_reason = "error"
            yield turn
            raise
        finally:
            for older in self.turns[:-1]:
                older.provenance = None  # only the last answer is inspected; keep memory flat
            self.focus = None
            self.refresh_memory()

    def retry(self, params: GenerationParams) -> Iterator[TurnView]:
        """Answer the last question again: the cache rewinds to just before it (earlier turns stay). After
        a snapshot reload the turns cannot be undone one by one: then it rewinds to the corpus end."""
        if not self.turns:
            raise EngineError("nothing to retry yet: ask a question first")
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
        self.turns, self.focus = [], None
        self.refresh_memory()

    # ------------------------------------------------------------------------------------ inspector
    @property
    def provenance(self):
        return self.turns[-1].provenance if self.turns else None

    def selection(self, focus: int | None, counts: bool = False) -> tuple[dict, dict]:
        """({CSA layer: value per entry}, {HCA layer: weight per entry}) of the whole last answer
        (focus None) or of its answer token `focus`; `counts`: times picked instead of weight."""
        prov = self.provenance
        if prov is None:
            return {}, {}
        if focus is None:
            return dict(prov.csa_counts if counts else prov.csa), dict(prov.hca)
        tok = prov.tokens[focus]
        csa, hca = {}, {}
        for layer, (ids, w) in tok.entries.items():
            n = prov.n_context // prov.rates[layer]
            arr = np.zeros(n)
            ok = (ids >= 0) & (ids < n)
            arr[ids[ok]] = 1.0 if (counts and layer in prov.csa) else w[ok]
            (csa if layer in prov.csa else hca)[layer] = arr
        return csa, hca

    def csa_rate(self) -> int:
        return self.engine.config.csa_rate

    def cell_position(self, layer: int, column: int, focus: int | None) -> int | None:
        """Context position of the heaviest selected entry in heatmap cell (layer, column)."""
        prov = self.provenance
        sel = self.selection(focus)[0].get(layer)
        if prov is None or sel is None:
            return None
        rate = prov.rates[layer]
        edges, _ = bin_positions(np.zeros(0), rate, prov.n_context, HEAT_COLUMNS)
        if not 0 <= column < len(edges) - 1:
            return None
        a, b = int(edges[column]) // rate, -(-int(edges[column + 1]) // rate)
        part = sel[a:b]
        if part.size == 0 or not np.any(part > 0):
            return None
        return (a + int(np.argmax(part))) * rate

    def source_target(self, target: str, focus: int | None) -> SourceView:
        """The viewer for a target: 'src:<turn>:<i>' (a source chip), 'pos:<context position>',
        'cell:<layer>:<column>' (a heatmap cell) or 'file:<name>:<line>'."""
        kind, _, rest = target.partition(":")
        try:
            if kind == "src":
                t, i = (int(x) for x in rest.split(":"))
                src = self.turns[t].sources[i]
            elif kind == "cell":
                layer, col = (int(x) for x in rest.split(":"))
            elif kind == "pos":
                pos = int(rest)
            elif kind == "file":
                name, _, line = rest.rpartition(":")
                line = int(line)
            else:
                raise ValueError(kind)
        except (ValueError, IndexError):
            raise InputError(f"nothing to open at {target!r}") from None
        if kind == "src":
            last = t == len(self.turns) - 1
            return self.source_view(src.file, src.line_start, src.line_end, focus if last else None,
                                    caption=f"source {i + 1} of answer {t + 1} · {src.weight:.0%} of the "
                                    f"corpus-bound attention · layers {', '.join(map(str, src.layers))}")
        if kind == "cell":
            pos = self.cell_position(layer, col, focus)
            if pos is None:
                raise InputError("that heatmap cell holds no selected block")
            return self.position_view(pos, focus, f"picked by CSA layer {layer}")
        if kind == "pos":
            return self.position_view(pos, focus)
        return self.source_view(name, line, line, focus)

    def position_view(self, pos: int, focus: int | None, why: str = "") -> SourceView:
        rate = self.csa_rate()
        spans = self.layout.locate(pos - self.offset, pos - self.offset + rate) if self.layout else []
        spans = [s for s in spans if s.line_start > 0]
        if not spans:
            raise InputError(f"context tokens {pos:,}–{pos + rate - 1:,} are not document text "
                             "(file header, chat preamble or the conversation)")
        s = spans[0]
        cap = f"tokens {pos:,}–{pos + rate - 1:,}" + (f" · {why}" if why else "")
        return self.source_view(s.name, s.line_start, s.line_end, focus, caption=cap)

    def source_view(self, name: str, line_start: int, line_end: int, focus: int | None,
                    caption: str = "") -> SourceView:
        """Document `name` around lines [line_start, line_end], each line's heat being the share of
        the selected CSA attention (whole answer or token `focus`) that landed on it."""
        if self.layout is None:
            raise InputError("no corpus is loaded")
        names = [d.name for d in self.layout.documents]
        if name not in names:
            raise InputError(f"no document named {name!r} in this corpus")
        i = names.index(name)
        lines = self._doc_lines(i)
        n = len(lines)
        line_start, line_end = max(1, min(line_start, n)), max(1, min(max(line_end, line_start), n))
        mid = (line_start + line_end) // 2
        first = max(1, min(mid - VIEW_LINES // 2, n - VIEW_LINES + 1))
        last = min(n, first + VIEW_LINES - 1)
        heat = self._line_heat(i, focus)
        shown = [heat.get(k, 0.0) for k in range(first, last + 1)]
        top = max(heat.values(), default=0.0) or 1.0
        return SourceView(name, first, lines[first - 1:last], [h / top for h in shown], (line_start, line_end), n,
                          caption)

    def _doc_lines(self, i: int) -> list[str]:
        if i not in self._lines:
            if len(self._lines) > 8:
                self._lines.clear()
            self._lines[i] = self.layout.texts[i].split("\n")
        return self._lines[i]

    def _line_heat(self, i: int, focus: int | None) -> dict[int, float]:
        """Line -> attention weight (summed over CSA layers) of the selected entries in document i."""
        prov = self.provenance
        if prov is None:
            return {}
        d = self.layout.documents[i]
        lo, hi = d.text_start + self.offset, d.text_end + self.offset  # context positions of its text
        heat: dict[int, float] = {}
        for layer, arr in self.selection(focus)[0].items():
            rate = prov.rates[layer]
            ids = np.flatnonzero(arr[lo // rate: -(-hi // rate)]) + lo // rate
            for e in ids.tolist():
                for s in self.layout.locate(e * rate - self.offset, e * rate + rate - self.offset):
                    if s.name == d.name and s.line_start > 0:
                        share = float(arr[e]) / (s.line_end - s.line_start + 1)
                        for k in range(s.line_start, s.line_end + 1):
                            heat[k] = heat.get(k, 0.0) + share
        return heat


__all__ = ["InputError", "SourceView", "TurnView", "Workspace", "build_corpus", "unique_names"]
