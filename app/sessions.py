"""Per-user state, keyed by gradio's `session_hash`: an LRU of resident sessions, spilled to disk.

Every browser tab (and every gradio_client) gets its own workspace: corpus, cache, chat. Nothing
per-user lives in module globals or in a shared `gr.State`; the registry below is owned by one
built demo and handed to its handlers.

At most `max_resident` workspaces keep their cache in memory. When one more becomes resident,
the least recently used idle one is spilled: its session is saved as a snapshot under
`spill_dir/<hash of the session key>/` and dropped. When its user comes back, the next model job
reloads it transparently (`Workspace.unspill`). A workspace busy with a job is never spilled.
`release` (on `demo.unload`, when the browser leaves) drops the workspace and its spill folder.

`SessionFiles` is where the users' files live meanwhile, all under the process's folder (removed
at the next start if the process died): each session's uploads, moved out of gradio's served
upload folder as soon as they are read, and the snapshots of the corpora sessions prefilled; both
go when the session ends (a snapshot once no live session holds it).

The registry only needs this from a workspace (see app/workspace.py):
    resident: bool, busy: str, last_used: float, spill(folder), unspill(), close()
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

import runtime

W = TypeVar("W")
SAVING = "saving"  # busy marker while a workspace is being spilled


def process_spill_dir(root: str | Path) -> Path:
    """This process's spill folder under `root` (`<root>/<pid>`); folders left there by processes
    that are gone are removed (their users' sessions cannot come back: session hashes are new)."""
    root = Path(root)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.isdigit() and not _alive(int(child.name)):
                shutil.rmtree(child, ignore_errors=True)
    return root / str(os.getpid())


def give_back_memory() -> None:
    """Return the heap's free pages to the OS (glibc `malloc_trim`; elsewhere nothing)."""
    runtime.trim_heap()


# glibc mallopt parameters and their defaults (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_TUNED = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_MAX: 0}  # as the benchmarks' MALLOC_*_ (mallopt takes an int)
_large = 0
_large_lock = threading.Lock()


def malloc_defaults() -> None:
    """glibc's own policy for the server's idle time, whatever MALLOC_* the environment set."""
    runtime.mallopt(_DEFAULTS)


@contextmanager
def large_allocations() -> Iterator[None]:
    """Around a prefill: glibc keeps freed large blocks for reuse instead of mapping and faulting in fresh
    pages for every chunk's temporaries (measured 2x on long prefills). When the last prefill ends the
    defaults return and free pages go back to the OS. Set for the whole process instead (launch.py did),
    each worker thread's arena stayed at its high-water mark, which `malloc_trim` does not lower, and the
    server's memory crept up with every wave of sessions (tests/test_load.py)."""
    global _large
    with _large_lock:
        _large += 1
        if _large == 1:
            runtime.mallopt(_TUNED)
    try:
        yield
    finally:
        with _large_lock:
            _large -= 1
            last = _large == 0
            if last:
                runtime.mallopt(_DEFAULTS)
        if last:
            give_back_memory()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def key_digest(key: str) -> str:
    """A folder name for a session key (client-chosen: never used as a path itself)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class SessionFiles:
    """The users' files of one process, under `root` (its `process_spill_dir`):
        uploads/<digest of key>/   a session's uploads, moved here once read (gradio serves its own
                                   upload folder to anyone holding a file's URL; nothing serves this);
        corpora/                   snapshots of the corpora sessions prefilled. Content-addressed, so
                                   the same files from another live session reuse a prefill; removed
                                   when the last session holding one ends, and never listed to others.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.corpora = self.root / "corpora"
        self._holders: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def uploads(self, key: str) -> Path:
        return self.root / "uploads" / key_digest(key)

    def exports(self, key: str) -> Path:
        """A new folder for one export of session `key` (reports, traces, figures), removed with its uploads
        when the session ends (gradio copies what a download returns into its own cache)."""
        base = self.uploads(key) / "exports"
        base.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=base))
        return folder

    def hold(self, key: str, snapshot: str | Path) -> None:
        """Session `key` uses `snapshot` (ignored unless it is one of ours: the library is not)."""
        path = Path(snapshot)
        if path.parent != self.corpora:
            return
        with self._lock:
            self._holders.setdefault(str(path), set()).add(key)

    def drop(self, key: str) -> None:
        """Session `key` ended: remove its uploads and the snapshots no other live session holds."""
        gone = []
        with self._lock:
            for path, keys in list(self._holders.items()):
                keys.discard(key)
                if not keys:
                    del self._holders[path]
                    gone.append(path)
        for path in gone:
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(self.uploads(key), ignore_errors=True)


class Busy(RuntimeError):
    """The user's workspace is already running a job (one at a time per user); the message says which."""

    code = "busy"  # app/errors.py


class Registry(Generic[W]):
    def __init__(self, create: Callable[[str], W], max_resident: int, spill_dir: str | Path):
        if max_resident < 1:
            raise ValueError(f"max_resident must be at least 1, got {max_resident}")
        self._create, self.max_resident, self.spill_dir = create, max_resident, Path(spill_dir)
        self._table: dict[str, W] = {}
        self._cond = threading.Condition()

    # ------------------------------------------------------------------------------------ lookup
    def spill_folder(self, key: str) -> Path:
        """Where `key`'s workspace is saved when evicted (the key itself is client-chosen: hashed)."""
        return self.spill_dir / key_digest(key)

    def peek(self, key: str) -> W:
        """The workspace of `key` (created empty if new) without making it resident: for views."""
        with self._cond:
            ws = self._table.get(key)
            if ws is None:
                ws = self._table[key] = self._create(key)
            ws.last_used = time.monotonic()
            return ws

    @contextmanager
    def use(self, key: str, task: str) -> Iterator[W]:
        """Resident workspace of `key`, marked busy with `task` for the duration (Busy if it is
        already running a job). Spills the least recently used idle workspaces beyond the limit."""
        with self._cond:
            ws = self.peek(key)
            while ws.busy == SAVING:  # being spilled right now: wait, then reload it
                self._cond.wait()
            if ws.busy:
                raise Busy(f"your session is still busy ({ws.busy}); wait for it or press Stop")
            ws.busy = task
        try:
            if not ws.resident:
                ws.unspill()
            self._evict(keep=key)
            yield ws
        finally:
            with self._cond:
                ws.busy = ""
                ws.last_used = time.monotonic()
                self._cond.notify_all()
            self._evict(keep=None)

    def release(self, key: str) -> None:
        """Forget `key` (the browser left): drop its session and its spill folder."""
        with self._cond:
            ws = self._table.get(key)
            if ws is None:
                return
            while ws.busy == SAVING:
                self._cond.wait()
            if ws.busy:  # a job is still running: it ends on its own; its stop flag is set by the caller
                ws.release_when_idle = True
                return
            del self._table[key]
        ws.close()
        shutil.rmtree(self.spill_folder(key), ignore_errors=True)
        del ws
        give_back_memory()

    # ------------------------------------------------------------------------------------ eviction
    def _evict(self, keep: str | None) -> None:
        while True:
            with self._cond:
                for key in [k for k, w in self._table.items() if getattr(w, "release_when_idle", False)
                            and not w.busy]:
                    self._table.pop(key).close()
                    shutil.rmtree(self.spill_folder(key), ignore_errors=True)
                resident = [(k, w) for k, w in self._table.items() if w.resident]
                if len(resident) <= self.max_resident:
                    return
                idle = [(w.last_used, k, w) for k, w in resident if not w.busy and k != keep]
                if not idle:
                    return  # every extra one is busy: evicted when its job ends
                _, key, victim = min(idle, key=lambda t: t[0])
                victim.busy = SAVING
            try:
                victim.spill(self.spill_folder(key))
            finally:
                with self._cond:
                    victim.busy = ""
                    self._cond.notify_all()

    # ------------------------------------------------------------------------------------ stats
    def __len__(self) -> int:
        return len(self._table)

    def resident_keys(self) -> list[str]:
        with self._cond:
            return [k for k, w in self._table.items() if w.resident]

    def close(self) -> None:
        with self._cond:
            table, self._table = self._table, {}
        for key, ws in table.items():
            ws.close()
            shutil.rmtree(self.spill_folder(key), ignore_errors=True)


__all__ = ["Busy", "Registry", "SAVING", "SessionFiles", "give_back_memory", "key_digest", "large_allocations",
           "malloc_defaults", "process_spill_dir"]
