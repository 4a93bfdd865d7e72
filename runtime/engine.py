"""Engine and chat sessions: one corpus prefilled once into a resident cache, then many questions.

`Engine(model, tokenizer)` holds the shared model and the limits; `engine.new_session()` gives a
`Session` with its own cache, corpus layout and chat history (one session per user/conversation;
a session is not meant for use from two threads at once, sessions of one engine are).

Context layout of a session -- the cache holds exactly this token sequence:

    <BOS><User>[corpus]                            prefilled once by load_corpus
    {question 1}<Assistant>{answer 1}<EOS>         the first question continues the first user turn
    <User>{question 2}<Assistant>{answer 2}<EOS>   each later turn appends only its own tokens
    ...

where [corpus] is the Layout of runtime/corpus.py ("### File: {name}\\n" + text + "\\n\\n" per
document), so the corpus sits once inside the first user turn and the conversation follows
DeepSeek-V4's chat format (runtime/tokenizer.py). An answer's last token and its closing EOS are
fed at the start of the next turn, so no forward pass is spent on a turn that never comes.

Limits are checked before any prefill: the whole context (corpus + `chat_reserve_tokens` for the
conversation) must fit the model's max_position_embeddings, the engine's `max_context_tokens` and
a memory budget for the cache (estimated per token from the config); otherwise ContextTooLarge
says how many tokens fit. Nothing is truncated.

Answers stream as `Piece`s and end with one `Answer` carrying the text, the provenance
(runtime/provenance.py, from a runtime.Capture of the answer's queries) and timings.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .cache import Cache
from .config import CSA, HCA, SLIDING
from .corpus import Corpus, Layout, Limits, Skipped, Span, ingest
from .introspect import Capture
from .memory import trim_heap
from .provenance import Provenance, compute_provenance
from .snapshot import (Fingerprints, SessionState, SnapshotError, chat_fingerprint, corpus_fingerprint,
                       load_snapshot, mark_cache, model_fingerprint, reserve_entries, rewind_cache,
                       save_snapshot, snapshot_info, tokenizer_fingerprint, weights_fingerprint)
from .tokenizer import DEFAULT_PATH as DEFAULT_TOKENIZER, Tokenizer

LAYER_KIND = {SLIDING: "sliding", CSA: "csa", HCA: "hca"}


class EngineError(ValueError):
    """A request the engine cannot serve; the message says why and what to change."""


class ContextTooLarge(EngineError):
    def __init__(self, message: str, tokens: int, fits: int):
        super().__init__(message)
        self.tokens, self.fits = tokens, fits


class Cancelled(EngineError):
    """A prefill stopped by Session.stop(); the session holds no corpus afterwards."""


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    capture: bool = True  # record selections for provenance (read-only, small cost per token)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise EngineError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {self.temperature}, "
                              f"{self.top_p}, {self.top_k}")


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
class Turn:
    question: str
    answer: str
    answer_ids: list[int]
    stop_reason: str


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class _LayerTimer:
    """Seconds per layer kind, from forward pre/post hooks on every attention and MoE module."""

    def __init__(self, model):
        self.model, self.seconds, self._t0 = model, {}, {}
        self._sync = model.device.type == "cuda"  # CUDA runs async: time what ran, not what was queued

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, module, args) -> None:
        self._t0[id(module)] = self._now()

    def _stop(self, kind: str, module, args, output) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + self._now() - self._t0.pop(id(module))

    @contextmanager
    def active(self):
        handles = []
        for block in self.model.layers:
            for mod, kind in ((block.attn, LAYER_KIND[block.attn.layer_type]), (block.ffn, "moe")):
                handles.append(mod.register_forward_pre_hook(self._start))
                handles.append(mod.register_forward_hook(partial(self._stop, kind)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def sample_next(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    """Next token from [vocab] logits: argmax at temperature 0, else top-k / top-p sampling."""
    if params.temperature <= 0:
        return int(logits.argmax())
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.numel():
        x = x.masked_fill(x < x.topk(params.top_k).values[-1], float("-inf"))
    if params.top_p < 1:
        sorted_x, order = x.sort(descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum - sorted_x.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(x.softmax(-1), 1, generator=generator))


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, *, chunk_size: int = 2048, max_context_tokens: int | None = None,
                 memory_budget_bytes: int | None = None, chat_reserve_tokens: int = 4096,
                 model_fingerprint: str | None = None, model_dir: str | os.PathLike | None = None,
                 index_dtype: torch.dtype | None = torch.bfloat16):
        cfg = model.config
        if tokenizer.vocab_size > cfg.vocab_size:
            raise EngineError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model's "
                              f"vocab_size is {cfg.vocab_size}: they do not belong together")
        if chunk_size < 1:
            raise EngineError(f"chunk_size must be positive, got {chunk_size}")
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        self.chunk_size = chunk_size
        self.max_context_tokens = max_context_tokens
        self.memory_budget_bytes = memory_budget_bytes  # None: 80% of the memory available when checking
        self.chat_reserve_tokens = chat_reserve_tokens
        self.model_dir = None if model_dir is None else Path(model_dir)
        self._model_fp = model_fingerprint
        self._tok_fp: str | None = None
        self._lock = threading.Lock()  # one forward at a time: sessions interleave per chunk / token
        self.index_dtype = index_dtype  # indexer keys of every session cache (see runtime.cache.Cache)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", **kw) -> "Engine":
        """Model from `model_dir`; tokenizer from `<model_dir>/tokenizer.json`, else assets/tokenizer.json."""
        from .model import load_model

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise EngineError(f"{model_dir}: no model there (config.json missing); pass a model folder "
                              f"(config.json + *.safetensors)")
        tok_path = model_dir / "tokenizer.json"
        tokenizer = Tokenizer.from_file(tok_path if tok_path.is_file() else DEFAULT_TOKENIZER)
        return cls(load_model(model_dir, device=device, dtype=dtype), tokenizer, model_dir=model_dir, **kw)

    # ------------------------------------------------------------------------------------ limits
    @property
    def preamble(self) -> list[int]:
        return [self.tokenizer.bos_id, self.tokenizer.user_id]

    def context_limit(self) -> tuple[int, str]:
        """(tokens, why): the most context tokens any session may hold."""
        n, why = self.config.max_position_embeddings, "the model's context (max_position_embeddings)"
        if self.max_context_tokens is not None and self.max_context_tokens < n:
            n, why = self.max_context_tokens, "the engine's max_context_tokens"
        return n, why

    def reserve_tokens(self) -> int:
        """Context kept free for the conversation after a corpus: chat_reserve_tokens, at most a quarter."""
        return min(self.chat_reserve_tokens, self.context_limit()[0] // 4)

    def cache_bytes_per_token(self) -> float:
        """Cache growth per context token: CSA entries + indexer keys, HCA entries (window is fixed)."""
        c, el = self.config, self.model.dtype.itemsize
        iel = el if self.index_dtype is None else self.index_dtype.itemsize
        per = 0.0
        for t in c.layer_types:
            if t == CSA:
                per += (c.head_dim * el + c.index_head_dim * iel) / c.csa_rate
            elif t == HCA:
                per += c.head_dim * el / c.hca_rate
        return per

    def fixed_cache_bytes(self) -> int:
        """Bytes that do not grow: sliding windows and pooling buffers (upper bound, fp32 buffers)."""
        c, el = self.config, self.model.dtype.itemsize
        total = c.num_hidden_layers * (c.sliding_window - 1) * c.head_dim * el
        for t in c.layer_types:
            if t == CSA:  # kv + index compressors, overlapping: 2x features, buffer + overlap
                total += 4 * 3 * c.csa_rate * (c.head_dim + c.index_head_dim) * 4
            elif t == HCA:
                total += 2 * c.hca_rate * c.head_dim * 4
        return total

    def estimate_cache_bytes(self, tokens: int) -> int:
        return int(self.fixed_cache_bytes() + self.cache_bytes_per_token() * tokens)

    def memory_budget(self) -> tuple[int | None, str]:
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes, "the engine's memory_budget_bytes"
        avail = _mem_available()
        if avail is None:
            return None, "unknown (available memory could not be read)"
        return int(0.8 * avail), f"80% of the {_fmt_bytes(avail)} of memory available now"

    def check_fits(self, tokens: int, documents: Sequence[tuple[str, int]] = ()) -> None:
        """Raise ContextTooLarge unless a context of `tokens` (+ the chat reserve) fits every limit.

        `documents`: optional (name, tokens) pairs, to name the largest ones in the message.
        """
        reserve = self.reserve_tokens()
        limit, why = self.context_limit()
        budget, budget_why = self.memory_budget()
        problems, fits = [], limit - reserve
        if tokens + reserve > limit:
            problems.append(f"{why} is {limit:,} tokens, {reserve:,} of which are kept for the conversation")
        if budget is not None:
            need = self.estimate_cache_bytes(tokens + reserve)
            by_memory = int((budget - self.fixed_cache_bytes()) / max(self.cache_bytes_per_token(), 1e-9)) - reserve
            fits = min(fits, by_memory)
            if need > budget:
                problems.append(f"its cache would need about {_fmt_bytes(need)} but the memory budget is "
                                f"{_fmt_bytes(budget)} ({budget_why})")
        if not problems:
            return
        fits = max(fits, 0)
        msg = (f"the corpus is too large: {tokens:,} tokens (with the chat preamble) but at most {fits:,} fit; "
               + "; ".join(problems) + f". Remove about {tokens - fits:,} tokens ({(tokens - fits) / tokens:.0%})"
               " of input; nothing was truncated.")
        big = sorted(documents, key=lambda d: -d[1])[:3]
        if big:
            msg += " Largest documents: " + ", ".join(f"{n} ({t:,} tokens)" for n, t in big) + "."
        raise ContextTooLarge(msg, tokens, fits)

    # ------------------------------------------------------------------------------------ identity
    def model_fingerprint(self) -> str:
        if self._model_fp is None:
            self._model_fp = (model_fingerprint(self.model_dir, self.model.dtype) if self.model_dir is not None
                              else weights_fingerprint(self.model))
        return self._model_fp

    def tokenizer_fingerprint(self) -> str:
        if self._tok_fp is None:
            self._tok_fp = tokenizer_fingerprint(self.tokenizer)
        return self._tok_fp

    # ------------------------------------------------------------------------------------ compute
    def forward(self, ids: Sequence[int], cache: Cache, capture: Capture | None = None,
                timer: _LayerTimer | None = None) -> torch.Tensor:
        """Feed `ids` into `cache`; float logits [vocab] of the last position."""
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)  # [1, S]
        with self._lock, torch.no_grad(), (timer.active() if timer else _nothing()):
            return self.model(x, cache, capture=capture, logits_to_keep=1)[0, -1]

    def new_session(self) -> "Session":
        return Session(self)


@contextmanager
def _nothing():
    yield


class Session:
    """One corpus + one cache + one conversation (see the module docstring for the layout)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._stop = threading.Event()
        self._clear()

    def _clear(self) -> None:
        self.cache: Cache = self.engine.model.new_cache(index_dtype=self.engine.index_dtype)
        self.layout: Layout | None = None
        self.history: list[Turn] = []
        self.chat_ids: list[int] = []  # tokens fed after the corpus
        self.pending: list[int] = []  # tokens of the last turn still to feed (its last token, EOS)
        self.last_logits: torch.Tensor | None = None  # [vocab] next-token logits at cache.length
        self._corpus_mark = mark_cache(self.cache)
        self._turn_marks: list[tuple] = []  # per answered turn: the state just before it (undo_turn)
        self._broken: str | None = None
        self._busy = False

    # ------------------------------------------------------------------------------------ state
    @property
    def offset(self) -> int:
        """Context position of the corpus layout's token 0."""
        return len(self.engine.preamble)

    @property
    def n_tokens(self) -> int:
        return self.cache.length

    @property
    def corpus_tokens(self) -> int:
        return self._corpus_mark.length

    def docs(self) -> list[tuple[str, int, int]]:
        """(name, start, end) of each document in context positions (for app/figures.py)."""
        if self.layout is None:
            return []
        return [(d.name, d.token_start + self.offset, d.token_end + self.offset) for d in self.layout.documents]

    def locate(self, tok_start: int, tok_end: int) -> list[Span]:
        """File line spans of context tokens [tok_start, tok_end)."""
        return [] if self.layout is None else self.layout.locate(tok_start - self.offset, tok_end - self.offset)

    def cache_bytes(self) -> dict[str, int]:
        return self.cache.nbytes()

    def dense_cache_bytes(self) -> int:
        return self.cache.dense_nbytes()

    def stop(self) -> None:
        """Ask the running answer (or prefill) to stop at the next token (chunk)."""
        self._stop.set()

    def _stopped(self, extra: threading.Event | None) -> bool:
        return self._stop.is_set() or (extra is not None and extra.is_set())

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
                    self._adopt(load_snapshot(path, eng.config, vars(fps), eng.model.device, eng.model.dtype,
                                              eng.reserve_tokens(), eng.index_dtype))
                    report.source, report.snapshot = "snapshot", path
                    report.timings.update(snapshot_load_s=time.perf_counter() - t3, prefill_tokens=0)
                    report.timings["total_s"] = time.perf_counter() - t0
                    return report
                except SnapshotError as e:
                    report.warnings.append(f"{e}; prefilling instead")
        self._clear()
        self.layout = layout
        report.timings.update(self._prefill(ids, progress, stop))
        self._corpus_mark = mark_cache(self.cache, self.last_logits)
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
        eng, timer = self.engine, _LayerTimer(self.engine.model)
        total, t0 = len(ids), time.perf_counter()
        room = total + eng.reserve_tokens()
        for s in range(0, total, eng.chunk_size):
            if self._stopped(stop):
                self._clear()
                raise Cancelled(f"prefill stopped after {s:,} of {total:,} tokens; the session is empty")
            self.last_logits = eng.forward(ids[s:s + eng.chunk_size], self.cache, timer=timer)
            reserve_entries(self.cache, room)
            trim_heap()  # the chunk's temporaries, not reused, would pile up (runtime/memory.py)
            if progress is not None:
                done, el = min(s + eng.chunk_size, total), time.perf_counter() - t0
                rate = done / el if el > 0 else 0.0
                progress(PrefillProgress(done, total, el, rate, (total - done) / rate if rate else 0.0,
                                         dict(timer.seconds)))
        el = time.perf_counter() - t0
        return {"prefill_s": el, "prefill_tokens": total, "prefill_tokens_per_s": total / el if el else 0.0,
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

    def _check_turn(self, turn: list[int]) -> None:
        if self._broken:
            raise EngineError(f"this session is unusable after an error ({self._broken}); call reset_chat()")
        if self._busy:
            raise EngineError("an answer is still streaming in this session; stop it or read it to the end first")
        limit, why = self.engine.context_limit()
        if self.cache.length + len(turn) + 1 > limit:
            raise ContextTooLarge(
                f"the conversation is full: {self.cache.length:,} tokens used, this question needs {len(turn) + 1:,} "
                f"more and {why} is {limit:,}; start a new conversation (reset_chat) to keep the corpus",
                self.cache.length + len(turn) + 1, limit)

    def _turn_ids(self, question: str) -> list[int]:
        tok = self.engine.tokenizer
        if self.cache.length == 0:
            head = self.engine.preamble  # no corpus: a plain chat
        elif not self.history:
            head = []  # the first question continues the user turn holding the corpus
        else:
            head = self.pending + [tok.user_id]
        return head + tok.encode(question) + [tok.assistant_id]

    def _answer(self, question: str, params: GenerationParams, stop) -> Iterator[Piece | Answer]:
        eng, tok = self.engine, self.engine.tokenizer
        turn = self._turn_ids(question)  # again: the state may have moved since ask()
        self._check_turn(turn)
        limit = eng.context_limit()[0]
        self._busy = True
        # a few small tensors by reference (the cache only appends past them): undo_turn comes back here
        before = (mark_cache(self.cache, self.last_logits), len(self.chat_ids), list(self.pending), len(self.history))
        t0 = time.perf_counter()
        capture = Capture() if params.capture else None
        answer, pieces, fed, reason = [], [], 0, "closed"
        try:
            for s in range(0, len(turn) - 1, eng.chunk_size):  # the prompt; only its last token is captured
                eng.forward(turn[s:min(s + eng.chunk_size, len(turn) - 1)], self.cache)
            logits = eng.forward(turn[-1:], self.cache, capture)
        except BaseException as e:
            self._broken, self._busy = f"{type(e).__name__} while reading the question", False
            raise
        self.chat_ids += turn
        self.pending = []
        first_query = self.cache.length - 1
        t1 = time.perf_counter()
        gen = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        decoder = tok.stream_decoder()
        stop_ids = {tok.eos_id, tok.user_id}
        ttft = None
        try:
            while True:
                nxt = sample_next(logits, params, gen)
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if nxt in stop_ids:
                    reason = "eos"
                    break
                answer.append(nxt)
                pieces.append(decoder.feed(nxt))
                yield Piece(len(answer) - 1, nxt, pieces[-1])
                if len(answer) >= params.max_new_tokens:
                    reason = "max_new_tokens"
                    break
                if self._stopped(stop):
                    reason = "stopped"
                    break
                if self.cache.length + 2 > limit:  # room for this token and the closing EOS
                    reason = "context_full"
                    break
                logits = eng.forward([nxt], self.cache, capture)
                fed += 1
                self.chat_ids.append(nxt)
        except GeneratorExit:
            raise
        except BaseException as e:
            self._broken = f"{type(e).__name__} while answering"
            raise
        finally:
            self.pending = answer[fed:] + [tok.eos_id]  # fed at the start of the next turn
            self.history.append(Turn(question, "".join(pieces), list(answer), reason))
            self._turn_marks.append(before)
            self.last_logits = logits
            self._busy = False
        tail = decoder.flush()
        if tail:
            pieces.append(tail)
            yield Piece(max(len(answer) - 1, 0), None, tail)
        self.history[-1].answer = "".join(pieces)
        t2 = time.perf_counter()
        prov = None
        if capture is not None and answer:
            prov = compute_provenance(capture, eng.config, self.layout, self.offset,
                                      [first_query + k for k in range(len(answer))], self.cache.length,
                                      answer, pieces[:len(answer)])
        t3 = time.perf_counter()
        generated = len(answer) + (reason == "eos")
        timings = {"prefill_tokens": len(turn), "prefill_s": t1 - t0, "time_to_first_token_s": ttft,
                   "decode_tokens": generated, "decode_s": t2 - t1,
                   "decode_tokens_per_s": generated / (t2 - t1) if t2 > t1 else 0.0,
                   "provenance_s": t3 - t2, "context_tokens": self.cache.length}
        yield Answer(self.history[-1].answer, list(answer), reason, prov, timings)

    def reset_chat(self) -> None:
        """Forget the conversation, keep the corpus: the cache rewinds to the corpus end (no prefill)."""
        if self._busy:
            raise EngineError("an answer is still streaming in this session; stop it or read it to the end first")
        rewind_cache(self.cache, self._corpus_mark)
        self.history, self.chat_ids, self.pending = [], [], []
        self.last_logits = self._corpus_mark.logits
        self._turn_marks = []
        self._broken = None

    def can_undo(self) -> bool:
        return bool(self._turn_marks) and not self._busy

    def undo_turn(self) -> Turn:
        """Take back the last question and its answer: the cache rewinds to just before that turn (no
        prefill; earlier turns stay). Returns the removed turn. Turns restored from a snapshot cannot
        be undone one by one (reset_chat still works)."""
        if self._busy:
            raise EngineError("an answer is still streaming in this session; stop it or read it to the end first")
        if not self._turn_marks:
            raise EngineError("no turn to undo" + (" (turns restored from a snapshot can only be cleared)"
                                                   if self.history else ""))
        mark, n_ids, pending, n_hist = self._turn_marks.pop()
        rewind_cache(self.cache, mark)
        self.chat_ids, self.pending, self.last_logits = self.chat_ids[:n_ids], pending, mark.logits
        removed = self.history[n_hist]
        del self.history[n_hist:]
        self._broken = None
        return removed

    # ------------------------------------------------------------------------------------ snapshots
    def fingerprints(self) -> Fingerprints:
        eng = self.engine
        return Fingerprints(eng.model_fingerprint(), eng.tokenizer_fingerprint(),
                            corpus_fingerprint(self.layout, eng.preamble), chat_fingerprint(self.chat_ids))

    def _chat_json(self) -> dict:
        return {"ids": self.chat_ids, "pending": self.pending,
                "history": [vars(t) for t in self.history]}

    def save_snapshot(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save this session (cache, corpus layout, conversation) under `directory`; returns its folder."""
        if self._broken:
            raise EngineError(f"this session is unusable after an error ({self._broken}); nothing saved")
        if self.cache.length == 0:
            raise EngineError("nothing to save: the session holds no corpus or conversation")
        state = SessionState(self.cache, self.layout, self._chat_json(), self._corpus_mark, self.last_logits)
        info = {"model": str(self.engine.model_dir or ""), "tokens": self.cache.length}
        return save_snapshot(directory, state, self.fingerprints(), info, overwrite)

    def load_snapshot(self, path: str | os.PathLike) -> LoadReport:
        """Replace this session's state by a snapshot made with the same model and tokenizer."""
        t0, eng = time.perf_counter(), self.engine
        info = snapshot_info(path)
        if info.complete:  # before reading the tensors: does it fit this engine's limits?
            eng.check_fits(info.tokens)
        expect = {"model": eng.model_fingerprint(), "tokenizer": eng.tokenizer_fingerprint()}
        self._adopt(load_snapshot(path, eng.config, expect, eng.model.device, eng.model.dtype, eng.reserve_tokens(),
                                  eng.index_dtype))
        return LoadReport(self.cache.length, 0 if self.layout is None else len(self.layout.documents), [],
                          "snapshot", Path(path), timings={"snapshot_load_s": time.perf_counter() - t0})

    def _adopt(self, state: SessionState) -> None:
        chat = state.chat
        try:
            history = [Turn(**t) for t in chat.get("history", [])]
            ids, pending = [int(i) for i in chat["ids"]], [int(i) for i in chat.get("pending", [])]
        except (TypeError, ValueError, KeyError) as e:
            raise SnapshotError(f"damaged snapshot (chat.json: {e})") from None
        self._clear()
        self.cache, self.layout, self.history = state.cache, state.layout, history
        self.chat_ids, self.pending = ids, pending
        self.last_logits, self._corpus_mark = state.last_logits, state.corpus_mark


__all__ = ["Answer", "Cancelled", "ContextTooLarge", "Engine", "EngineError", "GenerationParams", "LoadReport",
           "Piece", "PrefillProgress", "Session", "Turn", "sample_next"]
