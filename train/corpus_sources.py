"""Offline text corpus for tokenizer and LM training, built from files already on the machine.

Sources (see train/DATA.md for licences and sizes):

  stdlib  CPython standard-library ``.py`` files of the running interpreter (fallback /usr/lib/python3.11),
          site-/dist-packages excluded.
  pydoc   Python documentation reST sources, /usr/share/doc/python3.11/html/_sources/**/*.txt
          (Debian package ``python3.11-doc``).
  doc     Plain-text package documentation under /usr/share/doc (README, NEWS, changelog(.gz), copyright,
          *.txt/*.md/*.rst), exact duplicates removed, each file capped at ``DOC_MAX_BYTES``
          (changelogs/NEWS/HISTORY at ``CHANGELOG_MAX_BYTES``).
  gcide   GNU Collaborative International Dictionary of English (Debian ``dict-gcide``), split into
          virtual documents by the first two letters of the headword.

Train / held-out split
----------------------
Every document has a machine-independent *corpus key*, e.g. ``stdlib/json/decoder.py``,
``pydoc/library/json.rst.txt``, ``doc/git/changelog.gz`` or ``gcide/ab``. ``split_of`` hashes that key
(SHA-256) and puts ~10% of documents in ``"heldout"`` and the rest in ``"train"``. Because the key does not
contain the machine's install prefix, the same file lands in the same split on every machine. Held-out files
are meant as evaluation haystacks the model never saw during training.

Duplicates (identical cleaned text under several paths, common in /usr/share/doc) are collapsed onto the
smallest key, so the same text can never be in both splits.

Iteration order is deterministic: documents of each source are sorted by the hash of their key, and the
sources are interleaved so that each has emitted about the same number of bytes (a ``max_bytes`` prefix is a
balanced mix, not all stdlib).

Nothing here imports torch; only the standard library is used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

SOURCES: tuple[str, ...] = ("stdlib", "pydoc", "doc", "gcide")
SPLITS: tuple[str, ...] = ("train", "heldout")
HELDOUT_PER_MILLE = 100  # ~10% held out

DOC_ROOT = Path("/usr/share/doc")
PYDOC_ROOT = DOC_ROOT / "python3.11" / "html" / "_sources"
GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")
DOC_MAX_BYTES = 1 << 20  # cap per /usr/share/doc file (the first bytes are kept, cut at a line end)
CHANGELOG_MAX_BYTES = 256 << 10  # changelogs/NEWS are repetitive: keep only the newest 256 kB of each
MAX_FILE_BYTES = 16 << 20  # skip anything larger than this on disk

# C0/C1 control characters except \t and \n (\r is normalised to \n before this is applied).
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# --------------------------------------------------------------------------------------------- cleaning
def clean_text(data: bytes | str) -> str:
    """Decode UTF-8 (invalid bytes -> U+FFFD), normalise CRLF/CR to LF, strip control chars except \\n\\t."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, (bytes, bytearray)) else data
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def _read_bytes(path: Path) -> bytes | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read(MAX_FILE_BYTES * 4)
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None


def _looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:8192]


# --------------------------------------------------------------------------------------------- roots
def stdlib_root() -> Path | None:
    """The stdlib folder of the running interpreter, else /usr/lib/python3.11 (whichever exists first)."""
    cands = [sysconfig.get_paths().get("stdlib"),
             os.path.join(sys.base_prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}"),
             "/usr/lib/python3.11"]
    for c in cands:
        if c and (Path(c) / "os.py").is_file():
            return Path(c)
    return None


def _roots() -> list[tuple[str, Path]]:
    """(key prefix, root dir) pairs, most specific first (pydoc lives inside /usr/share/doc)."""
    out: list[tuple[str, Path]] = [("pydoc", PYDOC_ROOT)]
    sr = stdlib_root()
    if sr is not None:
        out.append(("stdlib", sr))
    for extra in ("/usr/lib/python3.11",):  # also accept the Debian stdlib path when another one is used
        if sr is None or Path(extra) != sr:
            out.append(("stdlib", Path(extra)))
    out.append(("doc", DOC_ROOT))
    out.append(("gcide", GCIDE_DICT))
    return out


# --------------------------------------------------------------------------------------------- split
def corpus_key(path: str | os.PathLike) -> str:
    """Machine-independent key of a document: ``<source>/<path relative to the source root>``.

    Accepts an absolute path on disk or an already formed key (``"stdlib/os.py"``, ``"gcide/ab"``).
    Paths outside every known root are returned unchanged (their split is then a hash of the full path).
    """
    s = os.fspath(path)
    if s.split("/", 1)[0] in SOURCES and not s.startswith("/"):
        return s
    p = Path(s)
    for prefix, root in _roots():
        if prefix == "gcide":
            if p == root:
                return "gcide"
            continue
        try:
            rel = p.relative_to(root)
        except ValueError:
            continue
        return f"{prefix}/{rel.as_posix()}"
    return s


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def split_of(path: str | os.PathLike) -> str:
    """``"heldout"`` for ~10% of documents, ``"train"`` otherwise; deterministic in the corpus key."""
    return "heldout" if _key_hash(corpus_key(path)) % 1000 < HELDOUT_PER_MILLE else "train"


# --------------------------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class Doc:
    key: str  # machine-independent corpus key (what split_of hashes)
    source: str  # one of SOURCES
    path: str  # file on this machine (for gcide: the .dict.dz file)


def _list_stdlib() -> list[Doc]:
    root = stdlib_root()
    if root is None:
        return []
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "dist-packages", "__pycache__")
                             and not d.startswith("config-"))
        for fn in filenames:
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                if not p.is_symlink():
                    docs.append(Doc(f"stdlib/{p.relative_to(root).as_posix()}", "stdlib", str(p)))
    return docs


def _list_pydoc() -> list[Doc]:
    if not PYDOC_ROOT.is_dir():
        return []
    return [Doc(f"pydoc/{p.relative_to(PYDOC_ROOT).as_posix()}", "pydoc", str(p))
            for p in PYDOC_ROOT.rglob("*.txt") if p.is_file()]


_DOC_NAMES = {"copyright", "changelog", "changelog.debian", "news", "news.debian", "authors", "todo",
              "thanks", "faq", "bugs", "history", "changes", "readme", "readme.debian", "contributors"}
_DOC_EXTS = {".txt", ".md", ".rst", ".text"}
_DOC_SKIP_DIRS = {"html", "examples", "test", "tests", "test-amd64"}


def _doc_candidate(name: str) -> bool:
    base = name[:-3] if name.endswith(".gz") else name
    low = base.lower()
    if low in _DOC_NAMES or low.startswith("readme") or low.startswith("news") or low.startswith("changelog"):
        return not low.endswith((".html", ".amd64", ".json", ".pdf"))
    return os.path.splitext(low)[1] in _DOC_EXTS


def _is_changelog(key: str) -> bool:
    low = key.rsplit("/", 1)[-1].lower()
    return low.startswith(("changelog", "news", "history", "changes"))


@lru_cache(maxsize=1)
def _list_doc_cached() -> tuple[Doc, ...]:
    if not DOC_ROOT.is_dir():
        return ()
    by_hash: dict[bytes, Doc] = {}
    for dirpath, dirnames, filenames in os.walk(DOC_ROOT):  # does not follow symlinked dirs
        d = Path(dirpath)
        dirnames[:] = sorted(x for x in dirnames if x.lower() not in _DOC_SKIP_DIRS)
        for fn in sorted(filenames):
            p = d / fn
            if p.is_symlink() or not _doc_candidate(fn):
                continue
            doc = Doc(f"doc/{p.relative_to(DOC_ROOT).as_posix()}", "doc", str(p))
            text = read_document(doc)
            if not text.strip():
                continue
            h = hashlib.sha256(text.encode("utf-8")).digest()
            if h not in by_hash or doc.key < by_hash[h].key:
                by_hash[h] = doc  # duplicates collapse onto the smallest key
    return tuple(by_hash.values())


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dict_b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def _gcide_group(headword: str) -> str:
    w = "".join(c for c in headword.lower() if c.isascii() and c.isalnum())
    if not w:
        return "_"
    return w[:2] if w[0].isalpha() else "0"


@lru_cache(maxsize=1)
def _gcide_groups() -> dict[str, tuple[tuple[int, int], ...]]:
    """group -> sorted, de-duplicated (offset, length) spans of dictionary entries."""
    if not (GCIDE_DICT.is_file() and GCIDE_INDEX.is_file()):
        return {}
    groups: dict[str, set[tuple[int, int]]] = {}
    with open(GCIDE_INDEX, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
                continue
            try:
                span = (_dict_b64(parts[1]), _dict_b64(parts[2]))
            except KeyError:
                continue
            groups.setdefault(_gcide_group(parts[0]), set()).add(span)
    # An entry can be indexed under several headwords; keep it only in its smallest group.
    owner: dict[tuple[int, int], str] = {}
    for g in sorted(groups):
        for span in groups[g]:
            owner.setdefault(span, g)
    out: dict[str, list[tuple[int, int]]] = {}
    for span, g in owner.items():
        out.setdefault(g, []).append(span)
    return {g: tuple(sorted(v)) for g, v in out.items()}


@lru_cache(maxsize=1)
def _gcide_bytes() -> bytes:
    with gzip.open(GCIDE_DICT, "rb") as f:  # dictzip is gzip-compatible
        return f.read()


def _list_gcide() -> list[Doc]:
    return [Doc(f"gcide/{g}", "gcide", str(GCIDE_DICT)) for g in _gcide_groups()]


def list_documents(split: str | None = None, sources: Sequence[str] = SOURCES) -> list[Doc]:
    """All documents of ``sources`` (optionally only those in ``split``), sorted by source then key hash."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    listers = {"stdlib": _list_stdlib, "pydoc": _list_pydoc, "doc": lambda: list(_list_doc_cached()),
               "gcide": _list_gcide}
    out: list[Doc] = []
    for s in sources:
        if s not in listers:
            raise ValueError(f"unknown source {s!r}; known: {SOURCES}")
        docs = listers[s]()
        if not docs:
            warnings.warn(f"corpus source {s!r} not found on this machine; skipped", stacklevel=2)
        if split is not None:
            docs = [d for d in docs if split_of(d.key) == split]
        out.extend(sorted(docs, key=lambda d: (_key_hash(d.key), d.key)))
    return out


def available_sources() -> list[str]:
    return [s for s in SOURCES if list_documents(None, [s]) != []]


# --------------------------------------------------------------------------------------------- reading
def read_document(doc: Doc) -> str:
    """Cleaned text of one document ('' if unreadable or binary)."""
    if doc.source == "gcide":
        blob = _gcide_bytes()
        group = doc.key.split("/", 1)[1]
        parts = [blob[o:o + n] for o, n in _gcide_groups().get(group, ())]
        return clean_text(b"\n".join(p.rstrip(b"\n") + b"\n" for p in parts))
    data = _read_bytes(Path(doc.path))
    if not data or _looks_binary(data):
        return ""
    if doc.source == "doc":
        cap = CHANGELOG_MAX_BYTES if _is_changelog(doc.key) else DOC_MAX_BYTES
        if len(data) > cap:
            data = data[:cap]
            data = data[: data.rfind(b"\n") + 1] or data
    return clean_text(data)


def iter_documents(split: str, max_bytes: int | None = None,
                   sources: Sequence[str] = SOURCES) -> Iterator[tuple[Doc, str]]:
    """Yield ``(doc, cleaned_text)`` of ``split``, sources interleaved by bytes, until ``max_bytes``
    UTF-8 bytes have been yielded (the last document is yielded whole, so the total may exceed it)."""
    docs = list_documents(split, sources)
    queues: dict[str, list[Doc]] = {}
    for d in docs:
        queues.setdefault(d.source, []).append(d)
    pos = {s: 0 for s in queues}
    emitted = {s: 0 for s in queues}
    total = 0
    while queues and (max_bytes is None or total < max_bytes):
        src = min(queues, key=lambda s: (emitted[s], SOURCES.index(s)))
        doc = queues[src][pos[src]]
        pos[src] += 1
        if pos[src] >= len(queues[src]):
            del queues[src]
        text = read_document(doc)
        if not text.strip():
            continue
        n = len(text.encode("utf-8"))
        emitted[src] += n
        total += n
        yield doc, text


def iter_texts(split: str, max_bytes: int | None = None, sources: Sequence[str] = SOURCES) -> Iterator[str]:
    """Cleaned UTF-8 texts (one per document) of ``split``; see ``iter_documents``."""
    for _doc, text in iter_documents(split, max_bytes, sources):
        yield text


def corpus_stats(sources: Iterable[str] = SOURCES) -> dict[str, dict[str, int]]:
    """{source: {files_train, files_heldout, bytes_train, bytes_heldout}} (reads everything)."""
    stats: dict[str, dict[str, int]] = {}
    for s in sources:
        st = {"files_train": 0, "files_heldout": 0, "bytes_train": 0, "bytes_heldout": 0}
        for d in list_documents(None, [s]):
            sp = split_of(d.key)
            st[f"files_{sp}"] += 1
            st[f"bytes_{sp}"] += len(read_document(d).encode("utf-8"))
        stats[s] = st
    return stats


if __name__ == "__main__":
    import json

    print("stdlib root:", stdlib_root())
    print(json.dumps(corpus_stats(), indent=1))
