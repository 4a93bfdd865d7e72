"""The engine: one shared model and tokenizer, the limits, and the sessions that use them.

`Engine(model, tokenizer)` holds what every session shares -- the model (stateless), the tokenizer,
the `Budget` (runtime/budget.py: context limit, chat reserve, memory budget), fingerprints for
snapshots, and one lock: sessions interleave per prefill chunk and decode token, one forward at a
time. `engine.new_session()` gives a `Session` (runtime/session.py) with its own cache, corpus and
conversation. Generation itself is runtime/generate.py, the one core every path uses.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

import torch

from .budget import Budget
from .cache import Cache
from .conversation import Turn
from .errors import Cancelled, ContextTooLarge, EngineError
from .generate import GenerationParams, forward, sample_next
from .introspect import Capture
from .isa import resolve as resolve_index_dtype, resolve_prefill
from .session import Answer, LoadReport, Piece, PrefillProgress, Session
from .snapshot import model_fingerprint, tokenizer_fingerprint, weights_fingerprint
from .timing import LayerTimer
from .tokenizer import DEFAULT_PATH as DEFAULT_TOKENIZER, Tokenizer

class Engine:
    def __init__(self, model, tokenizer: Tokenizer, *, chunk_size: int = 2048, max_context_tokens: int | None = None,
                 memory_budget_bytes: int | None = None, chat_reserve_tokens: int = 4096,
                 model_fingerprint: str | None = None, model_dir: str | os.PathLike | None = None,
                 index_dtype: str | torch.dtype | None = "auto"):
        cfg = model.config
        if tokenizer.vocab_size > cfg.vocab_size:
            raise EngineError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model's "
                              f"vocab_size is {cfg.vocab_size}: they do not belong together")
        if chunk_size < 1:
            raise EngineError(f"chunk_size must be positive, got {chunk_size}")
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        self.chunk_size = chunk_size
        # indexer keys of every session cache (runtime.cache.Cache): "auto" is runtime/isa.py's choice for this
        # CPU or device, as everywhere; a dtype name or a dtype overrides it, None keeps the model's dtype
        try:
            index_dtype = resolve_index_dtype(index_dtype, model.device)
        except ValueError as e:
            raise EngineError(str(e)) from None
        self.index_dtype = index_dtype
        self.budget = Budget(cfg, model.dtype, index_dtype, max_context_tokens, memory_budget_bytes,
                             chat_reserve_tokens, device=model.device)
        self.model_dir = None if model_dir is None else Path(model_dir)
        self._model_fp = model_fingerprint
        self._tok_fp: str | None = None
        self._lock = threading.Lock()  # one forward at a time: sessions interleave per chunk / token

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", prefill_dtype: str | torch.dtype | None = None,
                 **kw) -> "Engine":
        """Model from `model_dir`; tokenizer from `<model_dir>/tokenizer.json`, else assets/tokenizer.json.
        prefill_dtype: runtime.load_model's (None: $LONGLENS_PREFILL_DTYPE, else auto)."""
        from .model import load_model

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise EngineError(f"{model_dir}: no model there (config.json missing); pass a model folder "
                              f"(config.json + *.safetensors)")
        tok_path = model_dir / "tokenizer.json"
        tokenizer = Tokenizer.from_file(tok_path if tok_path.is_file() else DEFAULT_TOKENIZER)
        from .cluster import lead_if_distributed

        try:
            resolve_prefill(prefill_dtype, device)  # a bad name is the caller's error, before anything loads
        except ValueError as e:
            raise EngineError(str(e)) from None
        model = load_model(model_dir, device=device, dtype=dtype, prefill_dtype=prefill_dtype)
        model = lead_if_distributed(model)  # rank 0 under torchrun
        return cls(model, tokenizer, model_dir=model_dir, **kw)

    @property
    def preamble(self) -> list[int]:
        return [self.tokenizer.bos_id, self.tokenizer.user_id]

    # the budget's checks, as every caller of the engine needs them
    def context_limit(self) -> tuple[int, str]:
        return self.budget.context_limit()

    def reserve_tokens(self) -> int:
        return self.budget.reserve_tokens()

    def check_fits(self, tokens: int, documents: Sequence[tuple[str, int]] = ()) -> None:
        self.budget.check_fits(tokens, documents)

    def cache_bytes_per_token(self) -> float:
        return self.budget.cache_bytes_per_token()

    def fixed_cache_bytes(self) -> int:
        return self.budget.fixed_cache_bytes()

    def estimate_cache_bytes(self, tokens: int) -> int:
        return self.budget.estimate_cache_bytes(tokens)

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
    def guard(self, timer: LayerTimer | None = None) -> "_Guard":
        """The lock every forward of this engine's sessions holds (with `timer`'s hooks while held)."""
        return _Guard(self._lock, timer)

    def layer_timer(self) -> LayerTimer:
        """Seconds by layer kind (sliding / csa / hca attention, moe), hooked only while a guard holds it."""
        return LayerTimer(self.model, detail=False, attach=False)

    def forward(self, ids: Sequence[int], cache: Cache, capture: Capture | None = None) -> torch.Tensor:
        """Feed `ids` into `cache` under the engine's lock; float logits [vocab] of the last position."""
        return forward(self.model, ids, cache, capture, self.guard())

    def warm_up(self) -> threading.Thread | None:
        """Build the compiled decode step (runtime/compiled.py) now, in a background thread under the engine's
        lock, instead of in the first answer (6-60 s on a 2-core CPU; launch.py starts it with the server).
        None where there is nothing to build (eager decode, a process group, CUDA, already built)."""
        from .compiled import pending

        if not pending(self.model):
            return None
        thread = threading.Thread(target=self._warm, name="longlens-compile", daemon=True)
        thread.start()
        return thread

    def _warm(self) -> None:
        import time

        from .compiled import warm

        t0 = time.perf_counter()
        with self.guard(), torch.no_grad():
            fast = warm(self.model)
        state = "failed; decoding eagerly" if fast is None or fast.failed else "ready"
        print(f"Longlens: compiled decode step {state} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def new_session(self) -> Session:
        return Session(self)


class _Guard:
    """A reusable context: the engine's lock, plus a layer timer's hooks while it is held."""

    def __init__(self, lock: threading.Lock, timer: LayerTimer | None):
        self.lock, self.timer, self._active = lock, timer, None

    def __enter__(self):
        self.lock.acquire()
        if self.timer is not None:
            self._active = self.timer.active()
            self._active.__enter__()

    def __exit__(self, *exc):
        try:
            if self._active is not None:
                self._active.__exit__(*exc)
                self._active = None
        finally:
            self.lock.release()


__all__ = ["Answer", "Cancelled", "ContextTooLarge", "Engine", "EngineError", "GenerationParams", "LoadReport",
           "Piece", "PrefillProgress", "Session", "Turn", "sample_next"]
