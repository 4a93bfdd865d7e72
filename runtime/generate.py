"""The one generation core: prefill in chunks, decode one token, sample, stop. Token ids in, token ids out.

Everything that runs the model on a sequence goes through here -- the app's chat sessions
(runtime/engine.py), the CLI, the evaluation (runtime/evaluate.py) and the benchmarks (bench/) -- so a
figure measured on one path holds for the others. Nothing here knows about tokenisation or chat
layout; the caller passes ids and the ids that end an answer.

    logits = prefill(model, prompt_ids, cache, chunk_size=2048)      # [vocab] after the last id
    gen = Generation(model, cache, logits, GenerationParams(), stop_ids={eos})
    for token in gen: ...                                            # gen.stop_reason afterwards

The model is any callable `model(input_ids [1, S], cache, capture=..., logits_to_keep=1)` returning
[1, S', vocab] logits and extending `cache` by S (tests drive it with a mock), with `.device`; where it also has
`decode(input_ids [1, 1], cache, capture)` (runtime.model.Transformer: the compiled step of runtime/compiled.py
unless the model decodes eagerly), decode_one_token steps through that.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Sequence

import torch

from .errors import Cancelled, EngineError
from .memory import trim_heap


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
    return int(torch.multinomial(x.float().softmax(-1).cpu(), 1, generator=generator))


def forward(model, ids: Sequence[int], cache, capture=None, lock: contextlib.AbstractContextManager | None = None
            ) -> torch.Tensor:
    """Feed `ids` into `cache`; float logits [vocab] of the last position. `lock` is held for the call
    (an engine shares one model between sessions: one forward at a time, sessions interleave)."""
    x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)  # [1, S]
    with lock if lock is not None else contextlib.nullcontext(), torch.no_grad():
        return model(x, cache, capture=capture, logits_to_keep=1)[0, -1]


def decode_one_token(model, token: int, cache, capture=None, lock=None) -> torch.Tensor:
    """One decode step: feed `token`, return the next token's logits [vocab]. A model with a `decode` method
    (runtime.model.Transformer) takes the step there: its compiled step when enabled, else its forward."""
    if not hasattr(model, "decode"):
        return forward(model, (token,), cache, capture, lock)
    x = torch.tensor([[token]], dtype=torch.long, device=model.device)  # [1, 1]
    with lock if lock is not None else contextlib.nullcontext(), torch.no_grad():
        return model.decode(x, cache, capture)[0, -1]


def prefill(model, ids: Sequence[int], cache, *, chunk_size: int = 2048, capture=None,
            reserve_tokens: int | None = None, on_chunk: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None, lock=None, trim: bool = True) -> torch.Tensor | None:
    """Feed `ids` into `cache` in chunks of `chunk_size`; the next token's logits [vocab] (None if no ids).

    `capture` records only the last id's query (the one whose selection picks the next token);
    `reserve_tokens` sizes the entry buffers once for a context of that many tokens (growth never
    copies twice the cache); `on_chunk(done, total)` after each chunk; `should_stop()` before each
    chunk raises Cancelled (the cache then holds the chunks fed so far); `trim` returns each chunk's
    temporaries to the system (runtime/memory.py).
    """
    if chunk_size < 1:
        raise EngineError(f"chunk_size must be positive, got {chunk_size}")
    ids, total, logits = list(ids), len(ids), None
    body = total - 1 if capture is not None else total  # the captured last id goes alone
    for s in range(0, body, chunk_size):
        if should_stop is not None and should_stop():
            raise Cancelled(f"prefill stopped after {s:,} of {total:,} tokens")
        logits = forward(model, ids[s:min(s + chunk_size, body)], cache, None, lock)
        if reserve_tokens:
            cache.reserve(reserve_tokens)
        if trim:
            trim_heap()
        if on_chunk is not None:
            on_chunk(min(s + chunk_size, body), total)
    if body < total:
        logits = forward(model, ids[-1:], cache, capture, lock)
        if on_chunk is not None:
            on_chunk(total, total)
    return logits


class Generation:
    """Tokens after a prompt, one at a time: iterate for the ids (stop ids are not yielded).

    Stops (`stop_reason`) at a stop id ("eos"), `max_new_tokens`, `should_stop()` ("stopped"), when
    the context would pass `max_context` (room is kept for this token and one closing token:
    "context_full"), or when the consumer closes the iterator ("closed"). A token is fed to the cache
    only when another one is wanted after it, so no forward pass is spent on a token nothing reads:
    afterwards `tokens[fed:]` are the generated ids not yet in the cache, and `logits` are the
    next-token logits at `cache.length`.
    """

    def __init__(self, model, cache, logits: torch.Tensor, params: GenerationParams, *,
                 stop_ids: Collection[int] = (), capture=None, should_stop: Callable[[], bool] | None = None,
                 max_context: int | None = None, lock=None):
        self.model, self.cache, self.logits, self.params = model, cache, logits, params
        self.stop_ids, self.capture, self.should_stop = frozenset(stop_ids), capture, should_stop
        self.max_context, self.lock = max_context, lock
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        self.tokens: list[int] = []
        self.fed = 0
        self.stop_reason = "closed"

    @property
    def pending(self) -> list[int]:
        """Generated ids not fed to the cache yet (the last one, unless generation ended mid-way)."""
        return self.tokens[self.fed:]

    def __iter__(self) -> Iterator[int]:
        while True:
            nxt = sample_next(self.logits, self.params, self.generator)
            if nxt in self.stop_ids:
                self.stop_reason = "eos"
                return
            self.tokens.append(nxt)
            yield nxt
            if len(self.tokens) >= self.params.max_new_tokens:
                self.stop_reason = "max_new_tokens"
                return
            if self.should_stop is not None and self.should_stop():
                self.stop_reason = "stopped"
                return
            if self.max_context is not None and self.cache.length + 2 > self.max_context:
                self.stop_reason = "context_full"
                return
            self.logits = decode_one_token(self.model, nxt, self.cache, self.capture, self.lock)
            self.fed += 1


def generate(model, prompt: Sequence[int], cache, params: GenerationParams, *, stop_ids: Collection[int] = (),
             chunk_size: int = 2048, capture=None, max_context: int | None = None) -> Generation:
    """Prefill `prompt` (capturing its last query) and run a Generation to its end; returns it
    (`.tokens`, `.stop_reason`)."""
    logits = prefill(model, prompt, cache, chunk_size=chunk_size, capture=capture)
    gen = Generation(model, cache, logits, params, stop_ids=stop_ids, capture=capture, max_context=max_context)
    for _ in gen:
        pass
    return gen


__all__ = ["Generation", "GenerationParams", "decode_one_token", "forward", "generate", "prefill", "sample_next"]
