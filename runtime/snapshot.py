"""Session snapshots: a session's cache, corpus layout and chat on disk, and cache marks in memory.

On disk a snapshot is one folder `<directory>/<key>/` holding
    cache.safetensors   every cache tensor (compressed entries: only the n rows in use), the last
                        logits, and the small tensors of the corpus-end mark (see below);
    layout.json         the corpus Layout (runtime/corpus.py) -- token ids, line map and texts;
    chat.json           the conversation: tokens fed after the corpus, pending tokens, turns;
    manifest.json       format version, fingerprints, sizes and sha256 of the three files above.
The key is a hash of four fingerprints: the model (config + weight files, and the dtype), the
tokenizer file, the corpus (layout ids, lines, names, texts and the chat preamble) and the chat
tokens (empty for a fresh corpus). Identical inputs give the same key, so a corpus-only snapshot
is found again by recomputing the key; the manifest is still checked field by field, so a folder
renamed or copied under another key, another model's snapshot or a damaged file is refused with
a message saying which part differs.

Writes are atomic: everything goes to `.tmp-<key>-<pid>-*` first (files fsynced, manifest last),
then one rename makes it visible. A process killed mid-write leaves only a temp folder, which
loading and listing ignore and the next save removes. Loading re-hashes the files, so a snapshot
damaged later is refused too.

The cache's tensors and marks come from the cache itself (`Cache.state()` / `Cache.from_state`,
`CacheMark.state()` in runtime/cache.py); this module keeps only files, fingerprints and atomic writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .cache import Cache, CacheMark
from .config import ModelConfig
from .corpus import Layout
from .errors import CorpusError, SnapshotError

FORMAT = "longlens-snapshot/1"
FILES = ("cache.safetensors", "layout.json", "chat.json")
FULL_HASH_LIMIT = 2 << 30  # weight files above this are fingerprinted by header + head + tail
_PROBE = 64 << 20


# ----------------------------------------------------------------------------------- fingerprints
def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed: no ambiguity between parts
        h.update(b)
    return h.hexdigest()


def _file_sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _weights_file_digest(path: Path) -> str:
    size = path.stat().st_size
    if size <= FULL_HASH_LIMIT:
        return _file_sha(path)
    with open(path, "rb") as f:  # huge checkpoints: the header names every tensor; head and tail sample data
        head = f.read(_PROBE)
        f.seek(size - _PROBE)
        return _sha(str(size), head, f.read(_PROBE))


def model_fingerprint(folder: str | os.PathLike, dtype: torch.dtype) -> str:
    """Hash of config.json, every *.safetensors file (and the shard index) and the load dtype."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and (
        p.name == "config.json" or p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json")))
    if not any(p.name == "config.json" for p in files):
        raise SnapshotError(f"{folder}: no config.json to fingerprint the model by")
    return _sha(str(dtype), *(f"{p.name}:{p.stat().st_size}:{_weights_file_digest(p)}" for p in files))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hash of an in-memory model's config and every tensor (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(json.dumps(vars(model.config), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    src = Path(tokenizer.source)
    if not src.is_file():
        raise SnapshotError(f"tokenizer {tokenizer.source!r} was not loaded from a file; snapshots need its file")
    return _file_sha(src)


def corpus_fingerprint(layout: Layout | None, preamble: Sequence[int]) -> str:
    """Hash of what the corpus puts in the context: preamble ids, layout ids and lines, names, texts."""
    if layout is None:
        return _sha("no corpus", str(list(preamble)))
    return _sha("layout/1", str(list(preamble)), layout.ids.tobytes(), layout.lines.tobytes(),
                json.dumps([d.name for d in layout.documents]), *layout.texts)


def chat_fingerprint(ids: Sequence[int]) -> str:
    return "" if not ids else _sha("chat/1", str(list(ids)))


@dataclass(frozen=True)
class Fingerprints:
    model: str
    tokenizer: str
    corpus: str
    chat: str = ""  # empty: a snapshot taken right after the corpus

    @property
    def key(self) -> str:
        return _sha(self.model, self.tokenizer, self.corpus, self.chat)[:32]


# ------------------------------------------------------------------------------------ save / load
@dataclass
class SessionState:
    """What a snapshot holds: everything a session needs to continue exactly."""
    cache: Cache
    layout: Layout | None
    chat: dict  # {"ids": [...], "pending": [...], "history": [...]} (runtime/engine.py)
    corpus_mark: CacheMark  # the cache right after the corpus (what a new conversation rewinds to)
    corpus_logits: torch.Tensor | None  # [vocab] next-token logits at the corpus mark
    last_logits: torch.Tensor | None  # [vocab] next-token logits at cache.length


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    key: str
    complete: bool  # manifest readable (files are hashed only when loading)
    problem: str = ""
    created: str = ""
    tokens: int = 0
    chat_tokens: int = 0
    documents: int = 0
    names: tuple[str, ...] = ()  # first few document names
    bytes: int = 0
    model: str = ""
    fingerprints: dict = field(default_factory=dict)


def _tensors(state: SessionState) -> tuple[dict, dict]:
    """Flat name -> tensor dict of the cache, its corpus mark and logits; and the manifest's cache section."""
    cache, mark = state.cache, state.corpus_mark
    current = cache.state() | {"logits.last": state.last_logits}
    marked = mark.state() | {"logits.last": state.corpus_logits}
    # a mark tensor that is a current one is stored once (safetensors refuses shared storage)
    by_id = {id(t): n for n, t in current.items() if t is not None}
    shared = {n: by_id[id(t)] for n, t in marked.items() if t is not None and id(t) in by_id}
    out = {n: t.detach().contiguous() for n, t in current.items() if t is not None}
    out |= {f"mark.{n}": t.detach().contiguous() for n, t in marked.items() if t is not None and n not in shared}
    meta = {"length": cache.length, "batch_size": cache.batch_size, "entries": cache.entry_counts(),
            "mark": {"length": mark.length, "entries": mark.entry_counts(),
                     "shared": shared, "present": sorted(n for n, t in marked.items() if t is not None)}}
    return out, meta


def _fingerprint_dict(f: Fingerprints) -> dict:
    return {"model": f.model, "tokenizer": f.tokenizer, "corpus": f.corpus, "chat": f.chat}


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_stale(directory: Path) -> None:
    """Remove temp/trash folders left by processes that are gone (killed mid-save)."""
    for p in directory.iterdir():
        if not p.name.startswith((".tmp-", ".trash-")):
            continue
        try:
            os.kill(int(p.name.split("-")[2]), 0)  # names are .tmp-<key>-<pid>-...
            alive = True
        except (ValueError, IndexError, ProcessLookupError):
            alive = False
        except (PermissionError, OSError):
            alive = True
        if not alive:
            shutil.rmtree(p, ignore_errors=True)


def save_snapshot(directory: str | os.PathLike, state: SessionState, fingerprints: Fingerprints,
                  info: dict | None = None, overwrite: bool = False) -> Path:
    """Write `state` atomically to `<directory>/<key>`; an intact snapshot there is kept unless `overwrite`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = fingerprints.key
    final = directory / key
    if final.exists() and not overwrite:
        try:
            m = _read_manifest(final)
            if m["fingerprints"] == _fingerprint_dict(fingerprints):
                _verify_files(final, m)
                return final
        except SnapshotError:
            pass  # damaged or foreign: replaced below
    _clean_stale(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=directory))
    trash = None
    try:
        tensors, cache_meta = _tensors(state)
        save_file(tensors, tmp / "cache.safetensors")
        with open(tmp / "cache.safetensors", "rb") as f:
            os.fsync(f.fileno())
        _write(tmp / "layout.json", (state.layout.to_json() if state.layout is not None else "null").encode())
        _write(tmp / "chat.json", json.dumps(state.chat, ensure_ascii=False).encode())
        layout = state.layout
        manifest = {
            "format": FORMAT, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fingerprints": _fingerprint_dict(fingerprints),
            "cache": cache_meta,
            "dtype": str(next(iter(tensors.values())).dtype) if tensors else "",
            "documents": 0 if layout is None else len(layout.documents),
            "names": [] if layout is None else [d.name for d in layout.documents[:20]],
            "chat_tokens": len(state.chat.get("ids", [])),
            "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": _file_sha(tmp / n)} for n in FILES},
            "info": info or {},
        }
        _write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())  # last: its presence means complete
        _fsync_dir(tmp)
        if final.exists():  # move the old one aside first: rename cannot replace a non-empty folder
            trash = directory / f".trash-{key}-{os.getpid()}-{os.urandom(4).hex()}"
            os.rename(final, trash)
        os.rename(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def _read_manifest(path: Path) -> dict:
    mf = path / "manifest.json"
    if not path.is_dir():
        raise SnapshotError(f"{path}: no such snapshot")
    try:
        m = json.loads(mf.read_text())
    except FileNotFoundError:
        raise SnapshotError(f"{path}: incomplete snapshot (no manifest.json; a save was interrupted?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{path}: damaged snapshot (manifest.json unreadable: {e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise SnapshotError(f"{path}: not a {FORMAT} snapshot (format {got!r})")
    for k in ("fingerprints", "cache", "files"):
        if not isinstance(m.get(k), dict):
            raise SnapshotError(f"{path}: damaged snapshot (manifest.json lacks {k!r})")
    return m


def _verify_files(path: Path, m: dict) -> None:
    for name in FILES:
        want = m["files"].get(name)
        f = path / name
        if not isinstance(want, dict):
            raise SnapshotError(f"{path}: damaged snapshot (manifest.json does not list {name})")
        if not f.is_file():
            raise SnapshotError(f"{path}: damaged snapshot ({name} is missing)")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise SnapshotError(f"{path}: damaged snapshot ({name} has {size} bytes, the manifest says {want.get('bytes')})")
        if _file_sha(f) != want.get("sha256"):
            raise SnapshotError(f"{path}: damaged snapshot ({name} does not match its sha256 in manifest.json)")


_WHAT = {"model": "a different model (config, weights or dtype)", "tokenizer": "a different tokenizer",
         "corpus": "a different corpus", "chat": "a different conversation"}


def load_snapshot(path: str | os.PathLike, config: ModelConfig, expect: dict[str, str],
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  reserve_tokens: int = 0, index_dtype: torch.dtype | None = None) -> SessionState:
    """Load and check a snapshot. `expect` maps fingerprint names ("model", "tokenizer", "corpus",
    "chat") to the values this session has; each one given must match. `reserve_tokens` leaves room
    in the entry buffers for that many more context tokens; `index_dtype` is the indexer-key dtype of
    the session's caches (Cache.index_dtype): stored keys are converted to it."""
    path = Path(path)
    m = _read_manifest(path)
    for part, value in expect.items():
        have = m["fingerprints"].get(part)
        if have != value:
            raise SnapshotError(f"{path}: snapshot made with {_WHAT.get(part, part)}; refusing to load it "
                                f"(its {part} fingerprint {str(have)[:12]}…, this session's {value[:12]}…)")
    _verify_files(path, m)
    try:
        layout_text = (path / "layout.json").read_text()
        layout = None if layout_text == "null" else Layout.from_json(layout_text)
        chat = json.loads((path / "chat.json").read_text())
        with safe_open(path / "cache.safetensors", framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, CorpusError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{path}: damaged snapshot ({e})") from None
    except Exception as e:  # safetensors' own errors are not ValueErrors
        raise SnapshotError(f"{path}: damaged snapshot (cache.safetensors: {e})") from None
    cache_meta = m["cache"]
    try:
        cache, mark, corpus_logits = _build(cache_meta, tensors, config, dtype, reserve_tokens, index_dtype)
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{path}: snapshot does not fit this model's cache ({e})") from None
    if not isinstance(chat, dict) or not isinstance(chat.get("ids"), list):
        raise SnapshotError(f"{path}: damaged snapshot (chat.json)")
    return SessionState(cache, layout, chat, mark, corpus_logits, tensors.get("logits.last"))


def _build(meta: dict, tensors: dict, config: ModelConfig, dtype, reserve_tokens: int,
           index_dtype: torch.dtype | None = None) -> tuple[Cache, CacheMark, torch.Tensor | None]:
    cache = Cache.from_state(config, tensors, int(meta["length"]), meta["entries"], int(meta["batch_size"]),
                             index_dtype, reserve_tokens)
    w = next((lc.window for lc in cache.layers if lc.window is not None), None)
    if dtype is not None and w is not None and w.dtype != dtype:
        raise ValueError(f"cache dtype {w.dtype}, model dtype {dtype}")
    current = cache.state() | {"logits.last": tensors.get("logits.last")}
    shared, present = dict(meta["mark"]["shared"]), set(meta["mark"]["present"])
    marked = {n: (current[shared[n]] if n in shared else tensors[f"mark.{n}"]) for n in present}
    mark = CacheMark.from_state(meta["mark"]["length"], meta["mark"]["entries"], marked, config)
    return cache, mark, marked.get("logits.last")


def snapshot_info(path: str | os.PathLike) -> SnapshotInfo:
    """What a snapshot's manifest says (files are not hashed here); `complete` False with the problem."""
    p = Path(path)
    try:
        m = _read_manifest(p)
    except SnapshotError as e:
        return SnapshotInfo(p, p.name, False, str(e).split(": ", 1)[-1])
    return SnapshotInfo(
        p, p.name, True, "", str(m.get("created", "")), int(m["cache"].get("length", 0)),
        int(m.get("chat_tokens", 0)), int(m.get("documents", 0)), tuple(m.get("names", ())[:5]),
        sum(int(f.get("bytes", 0)) for f in m["files"].values() if isinstance(f, dict)),
        str((m.get("info") or {}).get("model", "")), dict(m["fingerprints"]))


def list_snapshots(directory: str | os.PathLike) -> list[SnapshotInfo]:
    """Snapshots in `directory`, newest first (interrupted saves, hidden temp folders, are not listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = [snapshot_info(p) for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]
    out.sort(key=lambda s: s.created, reverse=True)
    return out


__all__ = ["Fingerprints", "SessionState", "SnapshotError", "SnapshotInfo", "chat_fingerprint", "corpus_fingerprint",
           "list_snapshots", "load_snapshot", "model_fingerprint", "save_snapshot", "snapshot_info",
           "tokenizer_fingerprint", "weights_fingerprint"]
