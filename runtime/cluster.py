"""Rank 0 leads, the other ranks follow: one model spread over torch.distributed, driven by one process.

Under torchrun every rank holds a shard of the model (runtime/parallel.py) and a full copy of every
session's cache (attention keeps one K=V head, so each rank needs all of it for its own query heads).
Rank 0 runs the app, the CLI and all user state; it drives the model through a `Leader`, which looks like
the model to the engine and sessions (`new_cache`, `model(ids, cache, ...)`), and whose caches
(`RemoteCache`) announce every change -- mark, rewind, reserve, trim, checkpoint / restore, adoption of a
snapshot -- before making it. The other ranks run `follow(model)`: they receive each operation over a
control group and replay it on their shard and their copies of the caches, in the same order, so the
collectives inside each forward pair up.

- The control messages go over their own gloo group whose timeout is a year: idle followers wait for the
  next user for as long as the app is up. The model's collectives use the default group (NCCL on CUDA).
- One lock orders operations: a forward, with all its collectives, is one operation.
- Caches, marks and checkpoints are named by numbers; rank 0's objects free their followers' copies when
  they are garbage collected (the ids ride along with the next message, never from a finaliser).
- A heartbeat finds a dead rank while the app is idle. When a collective fails, the leader marks itself
  failed, every later call raises `RankFailed` (an error the app shows), and `on_failure` runs (launch.py
  logs it and exits the process).
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
import threading
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from .cache import Cache, CacheMark, Checkpoint
from .errors import LonglensError
from .introspect import Capture
from .parallel import Shard, current, init_from_env, shutdown

CONTROL_TIMEOUT = timedelta(days=365)  # followers wait this long for the next operation
HEARTBEAT_S = 15.0
_control = None  # the gloo group the operations travel on (made once per process, by connect)


class RankFailed(LonglensError):
    """A rank of the model stopped answering: this process cannot compute any more."""

    def __init__(self, message: str):
        super().__init__(f"{message}; the app must be restarted", code="rank_failed")


def connect(device: str = "auto") -> tuple[Shard, torch.device]:
    """Initialise torch.distributed from torchrun's environment and the control group (every rank calls this
    once, before loading the model); outside torchrun returns (SINGLE, device) and does nothing."""
    global _control
    shard, dev = init_from_env(device)
    if shard.active and _control is None:
        _control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return shard, dev


def _send(message: list) -> list:
    box = [message]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def _broadcast_tensors(tensors: dict[str, torch.Tensor | None], device: torch.device) -> dict[str, torch.Tensor | None]:
    """rank 0's named tensors on every rank (others pass {}): names, shapes and dtypes first, then the data
    over the default group (NCCL moves device tensors without a host copy)."""
    lead = dist.get_rank() == 0
    spec = [(n, None if t is None else (tuple(t.shape), t.dtype)) for n, t in tensors.items()] if lead else None
    out = {}
    for name, meta in _send(spec):
        if meta is None:
            out[name] = None
            continue
        t = tensors[name].contiguous() if lead else torch.empty(meta[0], dtype=meta[1], device=device)
        dist.broadcast(t, src=0)
        out[name] = t
    return out


_UNANNOUNCED = ("hidden",)  # model methods that compute but are not operations the followers replay


# ------------------------------------------------------------------------------------------ entry points
def follow_if_follower(model_dir, device: str = "auto", dtype: torch.dtype | None = None,
                       quantized: str = "keep", prefill_dtype: str | None = None) -> bool:
    """For launch.py and the CLIs, first thing: under torchrun, connect; on ranks other than 0 load this
    rank's shard and follow rank 0 until it stops, then return True (the caller exits). Otherwise False."""
    shard, dev = connect(device)
    if not shard.active or shard.rank == 0:
        return False
    from .model import load_model

    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    follow(load_model(model_dir, dev, dtype, quantized=quantized, prefill_dtype=prefill_dtype))
    disconnect()
    return True


def disconnect() -> None:
    """Drop the control group and destroy the process groups (the end of a run, on every rank)."""
    global _control
    _control = None  # no reference left to keep the group's threads alive past the teardown
    shutdown()


def lead_if_distributed(model, on_failure=None):
    """The model as rank 0 must drive it under torchrun (a Leader), or unchanged in one process."""
    if not current().active or isinstance(model, Leader):
        return model
    return Leader(model, on_failure or exit_soon)


def exit_soon(why: str, grace_s: float = 5.0) -> None:
    """Default on_failure: say so in the log, give the page a moment to show the error, then exit."""
    print(f"Longlens: {why}; exiting in {grace_s:.0f} s", file=sys.stderr, flush=True)
    threading.Timer(grace_s, os._exit, args=(1,)).start()


# ------------------------------------------------------------------------------------------ rank 0
class Leader:
    """The model as rank 0's engine sees it: same calls, each one replayed by every follower."""

    def __init__(self, model, on_failure=None):
        self.model, self.on_failure = model, on_failure
        self.failed: str | None = None
        self._lock = threading.RLock()
        self._depth = 0  # > 0 while an operation runs: nested cache calls inside it are not announced
        self._ids = itertools.count(1)
        self._freed: list[int] = []
        self._beat = threading.Thread(target=self._heartbeat, name="longlens-heartbeat", daemon=True)
        self._closed = threading.Event()
        self._beat.start()
        atexit.register(self.close)

    def __getattr__(self, name):  # config, dtype, device, layers, attach_timer, ...
        if name in _UNANNOUNCED:  # would run the model on rank 0 alone: the other ranks would never join
            raise AttributeError(f"{name} cannot be called on a model spread over ranks; use the model's call")
        return getattr(self.model, name)

    @property
    def shard(self) -> Shard:
        return current()

    # --------------------------------------------------------------------------------- operations
    def _run(self, message: list | None, local):
        """Announce `message` (unless nested in another operation) and run `local()`, holding the lock."""
        with self._lock:
            if self.failed:
                raise RankFailed(self.failed)
            announce = self._depth == 0 and message is not None
            self._depth += 1
            try:
                if announce:
                    freed, self._freed = self._freed, []
                    _send([freed] + message)
                return local()
            except (dist.DistError, RuntimeError) as e:
                if announce and _is_comm_error(e):
                    self._fail(f"a model rank stopped responding ({type(e).__name__}: {e})")
                    raise RankFailed(self.failed) from None
                raise
            finally:
                self._depth -= 1

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            if self.on_failure is not None:
                self.on_failure(why)

    def new_uid(self, obj) -> int:
        uid = next(self._ids)
        weakref.finalize(obj, self._freed.append, uid)
        return uid

    def __call__(self, input_ids, cache=None, capture=None, logits_to_keep: int = 0, steering=None):
        cache = cache if cache is not None else self.new_cache(input_ids.shape[0])
        message = ["forward", cache._uid, input_ids.cpu(), capture is not None, logits_to_keep, steering]
        return self._run(message, lambda: self.model(input_ids, cache, capture, logits_to_keep, steering))

    forward = __call__

    def decode(self, input_ids, cache, capture=None, steering=None):
        """One-token step (runtime/generate.decode_one_token): the model's `decode`, replayed by every rank."""
        if steering is not None:  # sharded models decode eagerly anyway: the steered forward, as announced
            return self(input_ids, cache, capture, 1, steering)
        message = ["decode", cache._uid, input_ids.cpu(), capture is not None]
        return self._run(message, lambda: self.model.decode(input_ids, cache, capture))

    def new_cache(self, batch_size: int = 1, index_dtype: torch.dtype | None = None) -> "RemoteCache":
        cache = RemoteCache(self, self.model.config, batch_size, index_dtype)
        self._run(["new_cache", cache._uid, batch_size, index_dtype], lambda: None)
        return cache

    def adopt(self, cache: Cache, *marks: CacheMark):
        """A cache (and marks of it) built on rank 0 alone, e.g. read from a snapshot, copied to every rank:
        (the RemoteCache, its marks)."""
        remote = RemoteCache(self, cache.config, cache.batch_size, cache.index_dtype)
        remote.__dict__.update({k: v for k, v in cache.__dict__.items() if k not in ("_leader", "_uid")})
        tagged = [self._tag(m) for m in marks]

        def local():
            _broadcast_tensors(cache.state(), self.model.device)
            for m in marks:
                _broadcast_tensors(m.state(), self.model.device)
        meta = [(m.length, m.entry_counts()) for m in marks]
        self._run(["adopt", remote._uid, cache.length, cache.entry_counts(), cache.batch_size, cache.index_dtype,
                   [m._uid for m in tagged], meta], local)
        return remote, tagged

    def _tag(self, mark: CacheMark) -> CacheMark:
        object.__setattr__(mark, "_uid", self.new_uid(mark))
        return mark

    def close(self) -> None:
        """Tell the followers to stop (end of a CLI run, or the app shutting down)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self.failed is None:
            try:
                self._run(["stop"], lambda: None)
            except RankFailed:
                pass
        disconnect()

    def _heartbeat(self) -> None:
        while not self._closed.wait(HEARTBEAT_S):
            if self.failed:
                return
            if self._lock.acquire(blocking=False):  # busy means alive: only idle time needs a ping
                try:
                    self._run(["ping"], lambda: None)
                except RankFailed:
                    return
                finally:
                    self._lock.release()


def _is_comm_error(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "peer", "timed out", "broken pipe"))


class RemoteCache(Cache):
    """Rank 0's cache: every change is announced to the followers' copies before it is made here."""

    def __init__(self, leader: Leader, config, batch_size: int = 1, index_dtype=None):
        super().__init__(config, batch_size, index_dtype)
        self._leader = leader
        self._uid = leader.new_uid(self)

    def mark(self) -> CacheMark:
        mark = super().mark()
        self._leader._tag(mark)
        self._leader._run(["mark", self._uid, mark._uid], lambda: None)
        return mark

    def rewind(self, mark: CacheMark) -> None:
        uid = getattr(mark, "_uid", None)
        if uid is None:  # a mark the followers never saw (made inside an operation): local only
            return super().rewind(mark)
        self._leader._run(["rewind", self._uid, uid], lambda: super(RemoteCache, self).rewind(mark))

    def reserve(self, tokens: int) -> None:
        self._leader._run(["reserve", self._uid, tokens], lambda: super(RemoteCache, self).reserve(tokens))

    def trim(self) -> None:
        self._leader._run(["trim", self._uid], lambda: super(RemoteCache, self).trim())

    def checkpoint(self, since: CacheMark) -> Checkpoint:
        return self._leader._run(["checkpoint", self._uid, since._uid], lambda: _RemoteCheckpoint(self, since))


class _RemoteCheckpoint(Checkpoint):
    def __init__(self, cache: RemoteCache, since: CacheMark):
        super().__init__(cache, since)
        self._uid = cache._uid  # one live checkpoint per cache at a time (a counterfactual's)

    def restore(self) -> None:
        self.cache._leader._run(["restore", self._uid], lambda: super(_RemoteCheckpoint, self).restore())


# ------------------------------------------------------------------------------------------ other ranks
def follow(model) -> None:
    """Replay rank 0's operations on this rank's shard until it says stop (or stops answering)."""
    caches: dict[int, Cache] = {}
    marks: dict[int, CacheMark] = {}
    checkpoints: dict[int, Checkpoint] = {}
    while True:
        try:
            freed, kind, *args = _send(None)
        except Exception as e:  # rank 0 is gone: nothing left to follow
            print(f"[rank {dist.get_rank()}] leader unreachable ({type(e).__name__}: {e}); stopping", flush=True)
            return
        for uid in freed:
            caches.pop(uid, None), marks.pop(uid, None), checkpoints.pop(uid, None)
        if kind == "stop":
            return
        try:
            if kind == "forward":
                uid, ids, capture, keep, steering = args
                with torch.no_grad():
                    model(ids.to(model.device), caches[uid], Capture() if capture else None, keep, steering)
            elif kind == "decode":
                uid, ids, capture = args
                with torch.no_grad():
                    model.decode(ids.to(model.device), caches[uid], Capture() if capture else None)
            elif kind == "new_cache":
                uid, batch, index_dtype = args
                caches[uid] = model.new_cache(batch, index_dtype)
            elif kind == "mark":
                marks[args[1]] = caches[args[0]].mark()
            elif kind == "rewind":
                caches[args[0]].rewind(marks[args[1]])
            elif kind == "reserve":
                caches[args[0]].reserve(args[1])
            elif kind == "trim":
                caches[args[0]].trim()
            elif kind == "checkpoint":
                checkpoints[args[0]] = caches[args[0]].checkpoint(marks[args[1]])
            elif kind == "restore":
                checkpoints.pop(args[0]).restore()
            elif kind == "adopt":
                uid, length, counts, batch, index_dtype, mark_uids, mark_meta = args
                caches[uid] = Cache.from_state(model.config, _broadcast_tensors({}, model.device), length, counts, batch, index_dtype)
                for muid, (mlen, mcounts) in zip(mark_uids, mark_meta):
                    marks[muid] = CacheMark.from_state(mlen, mcounts, _broadcast_tensors({}, model.device), model.config)
        except Exception as e:  # the same error rank 0 met at the same point: both go on
            print(f"[rank {dist.get_rank()}] {kind}: {type(e).__name__}: {e}", flush=True)


__all__ = ["Leader", "RankFailed", "RemoteCache", "connect", "disconnect", "exit_soon", "follow",
           "follow_if_follower", "lead_if_distributed"]
