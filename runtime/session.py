"""A chat session: one corpus prefilled once into a resident cache, then many questions.

`engine.new_session()` gives a `Session` with its own cache, a `CorpusContext` (the corpus layout and
the cache mark right after it) and a `Conversation` (turns, pending tokens, undo marks); see
runtime/conversation.py for the context layout. A session is not meant for use from two threads at
once; sessions of one engine are (the engine's lock lets them interleave per chunk and token).

The model runs only through the generation core (runtime/generate.py): `load_corpus` prefills with
progress and stop, `ask` prefills the question and streams the answer as `Piece`s ending with one
`Answer` carrying the text, the provenance (runtime/provenance.py, from a runtime.Capture of the
answer's queries) and timings. Limits (runtime/budget.py) are checked before any prefill.
`counterfactual` answers a turn again from its cache mark with a runtime.steering.Steering applied to
the CSA selection, and puts the session back exactly as it was.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .cache import Cache, CacheMark
from .config import CSA, HCA
from .conversation import Conversation, CorpusContext, Turn, TurnMark
from .corpus import Corpus, Layout, Limits, Skipped, Span, ingest
from .errors import Cancelled, ContextTooLarge, EngineError, SnapshotError
from .generate import Generation, GenerationParams, prefill
from .introspect import Capture
from .provenance import Provenance, compute_provenance
from .snapshot import (Fingerprints, SessionState, chat_fingerprint, corpus_fingerprint, load_snapshot,
                       save_snapshot, snapshot_info)
from .steering import LayerMass, SelectionDiff, SpanWeight, Steered, Steering, compare


@dataclass(frozen=True)
class PrefillProgress:
    done: int  # tokens prefilled so far
    total: int
    elapsed_s: float
    tokens_per_s: float
    eta_s: float
    layer_s: dict[str, float]  # seconds so far by layer kind: sliding / csa / hca attention, moe


@dataclass
class LoadReport:
    tokens: int  # context tokens after the corpus (preamble included)
    documents: int
    skipped: list[Skipped]
    source: str  # "prefill" or "snapshot"
    snapshot: Path | None = None  # snapshot used or written
    warnings: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Piece:
    index: int  # answer token index (the flushed tail of a turn repeats the last index)
    token_id: int | None  # None for the flushed tail
    text: str


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    stop_reason: str  # eos, max_new_tokens, stopped, context_full
    provenance: Provenance | None
    timings: dict


@dataclass
class Counterfactual:
    """One turn answered twice from the cache mark before it: as asked (`old`) and under `steering` (`new`).
    Weights and mass are head-averaged attention shares, averaged over each answer's tokens (runtime/steering.py)."""
    turn: int  # index into Session.history
    question: str
    steering: Steering
    params: GenerationParams  # what both answers ran with (capture on; a seed drawn to sample without one)
    old: Answer  # the turn's answer without steering (as ask() gave it, or replayed: old_replayed)
    new: Answer  # the same turn with the steering applied to every CSA layer's selection
    old_replayed: bool
    selection: dict[int, SelectionDiff]  # CSA layer -> entries picked before and not after, and vice versa
    mass: dict[int, LayerMass]  # layer -> (window, compressed, sink) split before and after
    spans: list[SpanWeight]  # each steered span's weight before and after, per CSA (and HCA) layer
    timings: dict
    describe: Callable[[int, int], str] | None = field(default=None, repr=False)  # context tokens -> "file:a-b"

    @property
    def changed(self) -> bool:
        return self.old.token_ids != self.new.token_ids

    def to_dict(self, top_sources: int = 5) -> dict:
        """The CLI / JSON form (no entry arrays): both answers, the steering, what moved."""
        sources = lambda a: ([] if a.provenance is None  # noqa: E731
                             else [x.to_dict() for x in a.provenance.sources[:top_sources]])
        r = lambda xs: [round(float(x), 6) for x in xs]  # noqa: E731
        return {"turn": self.turn, "steering": self.steering.to_dict(), "changed": self.changed,
                "old_answer": self.old.text, "old_stop_reason": self.old.stop_reason, "old_replayed": self.old_replayed,
                "answer": self.new.text, "stop_reason": self.new.stop_reason, "sources": sources(self.new),
                "selection": {str(k): v.to_dict(self.describe) for k, v in self.selection.items()},
                "mass": {str(k): {"before": r(v.before), "after": r(v.after)} for k, v in self.mass.items()},
                "spans": [x.to_dict() for x in self.spans],
                "timings": {k: round(v, 4) if isinstance(v, float) else v for k, v in self.timings.items()}}


@dataclass(frozen=True)
class _Kept:
    """The last answer ask() finished, with its turn and params (a counterfactual's `old` without a replay)."""
    turn: Turn
    params: GenerationParams
    answer: Answer


_NEW = "start a new conversation to go on with the corpus"


class Session:
    """One corpus + one cache + one conversation."""

    def __init__(self, engine):
        self.engine = engine
        self._stop = threading.Event()
        self._clear()

    def _clear(self) -> None:
        eng = self.engine
        self.cache: Cache = eng.model.new_cache(index_dtype=eng.index_dtype)
        self.corpus = CorpusContext(None, len(eng.preamble), self.cache.mark())
        self.chat = Conversation.for_tokenizer(eng.tokenizer)
        self.last_logits: torch.Tensor | None = None  # [vocab] next-token logits at cache.length
        self._kept: _Kept | None = None  # the last finished answer (counterfactual's old without a replay)
        self._broken: str | None = None
        self._busy = False

    # ------------------------------------------------------------------------------------ state
    @property
    def layout(self) -> Layout | None:
        return self.corpus.layout

    @property
    def history(self) -> list[Turn]:
        return self.chat.turns

    @property
    def chat_ids(self) -> list[int]:
        return self.chat.ids

    @property
    def pending(self) -> list[int]:
        return self.chat.pending

    @property
    def offset(self) -> int:
        """Context position of the corpus layout's token 0."""
        return self.corpus.offset

    @property
    def n_tokens(self) -> int:
        return self.cache.length

    @property
    def corpus_tokens(self) -> int:
        return self.corpus.tokens

    def docs(self) -> list[tuple[str, int, int]]:
        return self.corpus.docs()

    def locate(self, tok_start: int, tok_end: int) -> list[Span]:
        return self.corpus.locate(tok_start, tok_end)

    def cache_bytes(self) -> dict[str, int]:
        return self.cache.nbytes()

    def dense_cache_bytes(self) -> int:
        return self.cache.dense_nbytes()

    def stop(self) -> None:
        """Ask the running answer (or prefill) to stop at the next token (chunk)."""
        self._stop.set()

    def _stopper(self, extra: threading.Event | None) -> Callable[[], bool]:
        return lambda: self._stop.is_set() or (extra is not None and extra.is_set())

    def _check_idle(self) -> None:
        if self._busy:
            raise EngineError("an answer is still streaming in this session; stop it or read it to the end first",
                              code="busy", remedy="stop")

    # ------------------------------------------------------------------------------------ corpus
    def load_corpus(self, source: Sequence[str | os.PathLike] | Corpus,
                    progress: Callable[[PrefillProgress], None] | None = None,
                    snapshot_dir: str | os.PathLike | None = None, limits: Limits = Limits(),
                    stop: threading.Event | None = None) -> LoadReport:
        """Ingest (paths) or take a Corpus, check the limits, then reuse a matching snapshot from
        `snapshot_dir` or prefill in chunks (and save a snapshot there). Replaces any previous state."""
        self._stop.clear()
        eng, t0 = self.engine, time.perf_counter()
        corpus = source if isinstance(source, Corpus) else ingest(list(source), limits)
        t1 = time.perf_counter()
        layout = Layout.build(corpus, eng.tokenizer.encode_with_offsets)
        ids = eng.preamble + list(layout.ids)
        t2 = time.perf_counter()
        eng.check_fits(len(ids), [(d.name, d.token_end - d.token_start) for d in layout.documents])
        report = LoadReport(len(ids), len(layout.documents), list(corpus.skipped), "prefill")
        report.timings = {"ingest_s": t1 - t0, "tokenize_s": t2 - t1}
        fps = None
        if snapshot_dir is not None:
            try:
                fps = Fingerprints(eng.model_fingerprint(), eng.tokenizer_fingerprint(),
                                   corpus_fingerprint(layout, eng.preamble))
            except (SnapshotError, OSError) as e:
                report.warnings.append(f"snapshots disabled: {e}")
            path = None if fps is None else Path(snapshot_dir) / fps.key
            if path is not None and path.exists():
                t3 = time.perf_counter()
                try:
                    self._adopt(self._read_snapshot(path, vars(fps)))
                    report.source, report.snapshot = "snapshot", path
                    report.timings.update(snapshot_load_s=time.perf_counter() - t3, prefill_tokens=0)
                    report.timings["total_s"] = time.perf_counter() - t0
                    return report
                except SnapshotError as e:
                    report.warnings.append(f"{e}; prefilling instead")
        self._clear()
        report.timings.update(self._prefill(ids, progress, stop))
        self.corpus = CorpusContext(layout, len(eng.preamble), self.cache.mark(), self.last_logits)
        if fps is not None:
            t4 = time.perf_counter()
            try:
                report.snapshot = self.save_snapshot(snapshot_dir)
                report.timings["snapshot_save_s"] = time.perf_counter() - t4
            except (OSError, SnapshotError) as e:
                report.warnings.append(f"could not save a snapshot in {snapshot_dir}: {e}")
        report.timings["total_s"] = time.perf_counter() - t0
        return report

    def _prefill(self, ids: list[int], progress, stop) -> dict:
        eng = self.engine
        timer = eng.layer_timer()
        t0 = time.perf_counter()

        def on_chunk(done: int, total: int) -> None:
            if progress is not None:
                el = time.perf_counter() - t0
                rate = done / el if el > 0 else 0.0
                progress(PrefillProgress(done, total, el, rate, (total - done) / rate if rate else 0.0,
                                         dict(timer.seconds)))

        try:
            self.last_logits = prefill(eng.model, ids, self.cache, chunk_size=eng.chunk_size,
                                       reserve_tokens=len(ids) + eng.reserve_tokens(), on_chunk=on_chunk,
                                       should_stop=self._stopper(stop), lock=eng.guard(timer))
        except Cancelled as e:
            self._clear()
            raise Cancelled(f"{e}; the session is empty") from None
        el = time.perf_counter() - t0
        return {"prefill_s": el, "prefill_tokens": len(ids), "prefill_tokens_per_s": len(ids) / el if el else 0.0,
                "layer_s": dict(timer.seconds)}

    # ------------------------------------------------------------------------------------ chat
    def ask(self, question: str, params: GenerationParams | None = None,
            stop: threading.Event | None = None) -> Iterator[Piece | Answer]:
        """Stream the answer: `Piece`s as tokens come, then one `Answer`. Stops at EOS (or <User>),
        max_new_tokens, a full context, or stop() / `stop` set; closing the generator keeps the turn."""
        self._stop.clear()  # here, not in the generator body, so a stop() right after ask() counts
        if not isinstance(question, str) or not question.strip():
            raise EngineError("the question is empty")
        self._check_turn(self._turn_ids(question))  # fail now, not at the first next()
        return self._answer(question, params or GenerationParams(), stop)

    def _turn_ids(self, question: str) -> list[int]:
        return self.chat.turn_ids(self.engine.tokenizer.encode(question), self.cache.length)

    def _check_turn(self, turn: list[int]) -> None:
        if self._broken:
            raise EngineError(f"this session is unusable after an error ({self._broken}); {_NEW}",
                              code="broken", remedy="new_conversation")
        self._check_idle()
        limit, why = self.engine.context_limit()
        if self.cache.length + len(turn) + 1 > limit:
            raise ContextTooLarge(
                f"the conversation is full: {self.cache.length:,} tokens used, this question needs {len(turn) + 1:,} "
                f"more and {why} is {limit:,}; {_NEW}", self.cache.length + len(turn) + 1, limit,
                code="conversation_full", remedy="new_conversation")

    def _answer(self, question: str, params: GenerationParams, stop) -> Iterator[Piece | Answer]:
        eng, tok = self.engine, self.engine.tokenizer
        turn_ids = self._turn_ids(question)  # again: the state may have moved since ask()
        self._check_turn(turn_ids)
        self._busy = True
        before = self.chat.mark(self.cache.mark(), self.last_logits)  # what undo_turn comes back to
        t0 = time.perf_counter()
        capture = Capture() if params.capture else None
        try:
            logits = prefill(eng.model, turn_ids, self.cache, chunk_size=eng.chunk_size, capture=capture,
                             lock=eng.guard(), trim=False)
        except BaseException as e:
            self._broken, self._busy = f"{type(e).__name__} while reading the question", False
            raise
        turn = self.chat.start(question, turn_ids, before)
        first_query = self.cache.length - 1
        t1 = time.perf_counter()
        gen = Generation(eng.model, self.cache, logits, params, stop_ids={tok.eos_id, tok.user_id}, capture=capture,
                         should_stop=self._stopper(stop), max_context=eng.context_limit()[0], lock=eng.guard())
        decoder, pieces, ttft = tok.stream_decoder(), [], None
        try:
            for nxt in gen:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                pieces.append(decoder.feed(nxt))
                yield Piece(len(gen.tokens) - 1, nxt, pieces[-1])
        except GeneratorExit:
            raise
        except BaseException as e:
            self._broken = f"{type(e).__name__} while answering"
            raise
        finally:
            self.chat.finish(turn, gen.tokens, gen.fed, "".join(pieces), gen.stop_reason)
            self.last_logits = gen.logits
            self._busy = False
        if ttft is None:
            ttft = time.perf_counter() - t0
        answer = gen.tokens
        tail = decoder.flush()
        if tail:
            pieces.append(tail)
            yield Piece(max(len(answer) - 1, 0), None, tail)
        turn.answer = "".join(pieces)
        t2 = time.perf_counter()
        prov = None
        if capture is not None and answer:
            prov = compute_provenance(capture, eng.config, self.layout, self.offset,
                                      [first_query + k for k in range(len(answer))], self.cache.length,
                                      answer, pieces[:len(answer)])
        t3 = time.perf_counter()
        generated = len(answer) + (gen.stop_reason == "eos")
        timings = {"prefill_tokens": len(turn_ids), "prefill_s": t1 - t0, "time_to_first_token_s": ttft,
                   "decode_tokens": generated, "decode_s": t2 - t1,
                   "decode_tokens_per_s": generated / (t2 - t1) if t2 > t1 else 0.0,
                   "provenance_s": t3 - t2, "context_tokens": self.cache.length}
        final = Answer(turn.answer, list(answer), gen.stop_reason, prov, timings)
        self._kept = _Kept(turn, params, final)
        yield final

    def reset_chat(self) -> None:
        """Forget the conversation, keep the corpus: the cache rewinds to the corpus end (no prefill)."""
        self._check_idle()
        self.cache.rewind(self.corpus.mark)
        self.chat.clear()
        self.last_logits = self.corpus.logits
        self._broken = None

    def can_undo(self) -> bool:
        return self.chat.can_undo() and not self._busy

    def undo_turn(self) -> Turn:
        """Take back the last question and its answer: the cache rewinds to just before that turn (no
        prefill; earlier turns stay). Returns the removed turn. Turns restored from a snapshot cannot
        be undone one by one (reset_chat still works)."""
        self._check_idle()
        mark, removed = self.chat.undo()
        self.cache.rewind(mark.cache)
        self.last_logits = mark.logits
        self._broken = None
        return removed

    # ------------------------------------------------------------------------------------ counterfactual
    def steering(self, exclude=(), include=(), index_topk: int | None = None) -> Steering:
        """A Steering over this session's corpus: each span a `FILE[:START-END]` line spec (the document's
        name in the corpus, lines 1-based inclusive) or a (start, end) range of context tokens."""
        return Steering.from_specs(self.layout, self.offset, exclude, include, index_topk)

    def counterfactual(self, steering: Steering, params: GenerationParams | None = None, turn: int = -1,
                       stop: threading.Event | None = None,
                       on_piece: Callable[[str, Piece], None] | None = None) -> Counterfactual:
        """Answer turn `turn` (an index into `history`, the last by default) again with `steering` forced on
        every CSA layer's selection, from the cache mark taken just before that turn: no corpus prefill, only
        the turn's own prompt and answer are fed. Returns both answers and what moved (`Counterfactual`).

        `old` is the Answer ask() gave for that turn when it is the last one this session finished, with
        the same params, and ran to its end; else the turn is replayed from its mark without steering.
        params None: those the turn was asked with (the defaults if unknown); capture is always on, and
        sampling without a seed draws one, shared by a replayed old and the new answer. Afterwards the
        session is exactly as before -- cache, conversation, next-token logits -- so the next question goes
        on as if this had not happened. `on_piece("old" | "new", piece)` streams the runs' pieces; stop()
        or `stop` ends a run early (stop_reason "stopped"). Turns restored from a snapshot have no mark."""
        self._stop.clear()
        if not isinstance(steering, Steering):
            raise EngineError("a counterfactual needs a Steering: what to exclude, include or change")
        if self._broken:
            raise EngineError(f"this session is unusable after an error ({self._broken}); {_NEW}",
                              code="broken", remedy="new_conversation")
        self._check_idle()
        t, mark = self._turn_mark(turn)
        question = self.chat.turns[t].question
        prompt = self._prompt_at(mark, question)
        kept = self._kept if self._kept is not None and self._kept.turn is self.chat.turns[t] else None
        params = replace(params or (kept.params if kept is not None else GenerationParams()), capture=True)
        reuse = (kept is not None and replace(kept.params, capture=True) == params
                 and kept.answer.stop_reason in ("eos", "max_new_tokens", "context_full")
                 and (kept.answer.provenance is not None or not kept.answer.token_ids))
        if params.temperature > 0 and params.seed is None and not reuse:
            params = replace(params, seed=secrets.randbits(31))
        self._check_steering(steering)
        t0 = time.perf_counter()
        self._busy = True
        rollback = self.cache.checkpoint(mark.cache)
        try:
            old = kept.answer if reuse else self._run_turn(prompt, mark.cache, params, None, stop, on_piece, "old")
            new = self._run_turn(prompt, mark.cache, params, steering, stop, on_piece, "new")
        finally:
            try:
                rollback.restore()
            except BaseException as e:
                self._broken = f"{type(e).__name__} while putting the session back after a counterfactual"
                raise
            finally:
                self._busy = False
        cfg = self.engine.config
        rates = lambda kind: {l: cfg.rate(l) for l, x in enumerate(cfg.layer_types) if x == kind}  # noqa: E731
        selection, mass, spans = compare(old.provenance, new.provenance, steering, rates(CSA), rates(HCA),
                                         self._describe)
        timings = {"total_s": time.perf_counter() - t0,  # both runs; fed_tokens: what they fed (no corpus)
                   "fed_tokens": new.timings["fed_tokens"] + (0 if reuse else old.timings["fed_tokens"])}
        return Counterfactual(t, question, steering, params, old, new, not reuse, selection, mass, spans, timings,
                              self._describe)

    def _turn_mark(self, turn: int) -> tuple[int, TurnMark]:
        turns = self.chat.turns
        if not turns:
            raise EngineError("there is no answered question to compare yet: ask one first")
        try:
            t = range(len(turns))[turn]
        except (IndexError, TypeError):
            raise EngineError(f"there is no turn {turn!r}: the conversation has {len(turns)}") from None
        mark = next((m for m in self.chat.marks if m.turns == t), None)
        if mark is None:
            raise EngineError("this turn was restored from a snapshot and has no cache mark to go back to; "
                              "ask the question again to compare")
        return t, mark

    def _prompt_at(self, mark: TurnMark, question: str) -> list[int]:
        """The ids ask() fed for the turn that started at `mark` (laid out by Conversation.turn_ids)."""
        c = self.chat
        then = Conversation(c.preamble, c.user_id, c.assistant_id, c.eos_id, pending=list(mark.pending),
                            turns=c.turns[:mark.turns])
        ids = then.turn_ids(self.engine.tokenizer.encode(question), mark.cache.length)
        if c.ids[mark.ids:mark.ids + len(ids)] != ids:
            raise RuntimeError("the conversation's ids do not hold this turn's prompt where its mark says")
        return ids

    def _check_steering(self, steering: Steering) -> None:
        """At most index_topk entries can be forced into a selection: refuse more, before any forward."""
        cfg, limit = self.engine.config, self.engine.context_limit()[0]
        k = steering.index_topk or cfg.index_topk
        for layer, kind in enumerate(cfg.layer_types):
            if kind == CSA and steering.include:
                n = len(steering.entry_ids("include", cfg.rate(layer), limit // cfg.rate(layer) + 1))
                if n > k:
                    raise EngineError(f"the included spans cover {n:,} compressed entries, but a selection holds "
                                      f"{k:,}; include less, or raise index_topk to at least {n:,}")

    def _describe(self, tok_start: int, tok_end: int) -> str:
        """'a.py:3-9; b.md:1-2' for context tokens [tok_start, tok_end) ('' outside the corpus)."""
        return "; ".join(f"{s.name}:{s.line_start}-{s.line_end}" if s.line_start else f"{s.name} (header)"
                         for s in self.locate(tok_start, tok_end))

    def _run_turn(self, prompt: list[int], at: CacheMark, params: GenerationParams, steering: Steering | None,
                  stop, on_piece, which: str) -> Answer:
        """Rewind the cache to `at`, feed `prompt` and generate an answer (steered or not), with provenance."""
        eng, tok = self.engine, self.engine.tokenizer
        self.cache.rewind(at)
        model = eng.model if steering is None else Steered(eng.model, steering)
        capture = Capture()
        t0 = time.perf_counter()
        logits = prefill(model, prompt, self.cache, chunk_size=eng.chunk_size, capture=capture, lock=eng.guard(),
                         trim=False)
        first_query = self.cache.length - 1
        t1 = time.perf_counter()
        gen = Generation(model, self.cache, logits, params, stop_ids={tok.eos_id, tok.user_id}, capture=capture,
                         should_stop=self._stopper(stop), max_context=eng.context_limit()[0], lock=eng.guard())
        decoder, pieces = tok.stream_decoder(), []
        for nxt in gen:
            pieces.append(decoder.feed(nxt))
            if on_piece is not None:
                on_piece(which, Piece(len(gen.tokens) - 1, nxt, pieces[-1]))
        tail = decoder.flush()
        if tail and on_piece is not None:
            on_piece(which, Piece(max(len(gen.tokens) - 1, 0), None, tail))
        t2 = time.perf_counter()
        answer = list(gen.tokens)
        prov = None
        if answer:
            prov = compute_provenance(capture, eng.config, self.layout, self.offset,
                                      [first_query + k for k in range(len(answer))], self.cache.length,
                                      answer, pieces[:len(answer)])
        timings = {"prefill_tokens": len(prompt), "prefill_s": t1 - t0,
                   "decode_tokens": len(answer) + (gen.stop_reason == "eos"), "decode_s": t2 - t1,
                   "provenance_s": time.perf_counter() - t2, "fed_tokens": len(prompt) + gen.fed,
                   "context_tokens": self.cache.length}
        return Answer("".join(pieces) + tail, answer, gen.stop_reason, prov, timings)

    # ------------------------------------------------------------------------------------ snapshots
    def fingerprints(self) -> Fingerprints:
        eng = self.engine
        return Fingerprints(eng.model_fingerprint(), eng.tokenizer_fingerprint(),
                            corpus_fingerprint(self.layout, eng.preamble), chat_fingerprint(self.chat.ids))

    def save_snapshot(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save this session (cache, corpus layout, conversation) under `directory`; returns its folder."""
        if self._broken:
            raise EngineError(f"this session is unusable after an error ({self._broken}); nothing saved",
                              code="broken", remedy="new_conversation")
        if self.cache.length == 0:
            raise EngineError("nothing to save: the session holds no corpus or conversation")
        state = SessionState(self.cache, self.layout, self.chat.to_json(), self.corpus.mark, self.corpus.logits,
                             self.last_logits)
        info = {"model": str(self.engine.model_dir or ""), "tokens": self.cache.length}
        return save_snapshot(directory, state, self.fingerprints(), info, overwrite)

    def load_snapshot(self, path: str | os.PathLike) -> LoadReport:
        """Replace this session's state by a snapshot made with the same model and tokenizer."""
        t0, eng = time.perf_counter(), self.engine
        info = snapshot_info(path)
        if info.complete:  # before reading the tensors: does it fit this engine's limits?
            eng.check_fits(info.tokens)
        self._adopt(self._read_snapshot(path, {"model": eng.model_fingerprint(),
                                               "tokenizer": eng.tokenizer_fingerprint()}))
        return LoadReport(self.cache.length, 0 if self.layout is None else len(self.layout.documents), [],
                          "snapshot", Path(path), timings={"snapshot_load_s": time.perf_counter() - t0})

    def _read_snapshot(self, path, expect: dict) -> SessionState:
        eng = self.engine
        return load_snapshot(path, eng.config, expect, eng.model.device, eng.model.dtype, eng.reserve_tokens(),
                             eng.index_dtype)

    def _adopt(self, state: SessionState) -> None:
        chat = Conversation.for_tokenizer(self.engine.tokenizer)
        try:
            chat.load_json(state.chat)
        except ValueError as e:
            raise SnapshotError(f"damaged snapshot ({e})") from None
        self._clear()
        cache, corpus_mark = state.cache, state.corpus_mark
        if hasattr(self.engine.model, "adopt"):  # under torchrun: every rank takes a copy of the loaded cache
            cache, (corpus_mark,) = self.engine.model.adopt(cache, corpus_mark)
        self.cache, self.chat, self.last_logits = cache, chat, state.last_logits
        self.corpus = CorpusContext(state.layout, len(self.engine.preamble), corpus_mark, state.corpus_logits)


__all__ = ["Answer", "Counterfactual", "LoadReport", "Piece", "PrefillProgress", "Session"]
