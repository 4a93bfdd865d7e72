"""Haystack text from files already on the machine: the corpus sources, their train / held-out split, and the
manifest that pins the held-out text evaluation cuts its haystacks from. Standard library only (no torch).

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
are the evaluation haystacks the model never saw during training.

Duplicates (identical cleaned text under several paths, common in /usr/share/doc) are collapsed onto the
smallest key, so the same text can never be in both splits.

Iteration order is deterministic: documents of each source are sorted by the hash of their key, and the
sources are interleaved so that each has emitted about the same number of bytes (a ``max_bytes`` prefix is a
balanced mix, not all stdlib).

Pinned held-out text (``MANIFEST``, runtime/haystacks.json)
-----------------------------------------------------------
Which held-out documents a machine has depends on its installed packages and Python, so the listing alone does
not make evaluation numbers reproduce elsewhere. The manifest fixes the held-out documents in their iteration
order with the SHA-256 of each one's cleaned text; ``pinned_texts`` reads those documents (by key, without
listing the machine's files) and checks every one it uses before anything runs. A missing or different
document is an error that names the file and the package to install; ``LONGLENS_HAYSTACKS=warn`` (or
``strict=False``) turns it into a warning and goes on with what the machine has. Files passed with
``python -m runtime eval --haystack`` are not pinned.

    python -m runtime.haystacks                   # sizes per source and split (reads everything, ~5 s)
    python -m runtime.haystacks --check           # verify every document of the manifest on this machine
    python -m runtime.haystacks --write-manifest  # pin this machine's held-out documents (changes the numbers)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
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


# --------------------------------------------------------------------------------------------- pinned held-out text
MANIFEST = Path(__file__).resolve().with_name("haystacks.json")
_INSTALL = {"pydoc": "python3.11-doc", "gcide": "dict-gcide"}  # source -> Debian package


class HaystackError(RuntimeError):
    """The machine's held-out documents are not the ones the manifest pins."""


@dataclass(frozen=True)
class Pinned:
    key: str  # corpus key
    nbytes: int  # UTF-8 bytes of the cleaned text
    sha256: str  # of the cleaned text


def load_manifest(path: str | os.PathLike | None = None) -> dict:
    """{"python", "packages", "documents": [Pinned, ...] (iteration order), ...}"""
    data = json.loads(Path(path or MANIFEST).read_text())
    data["documents"] = [Pinned(k, n, s) for k, n, s in data["documents"]]
    return data


def doc_for_key(key: str) -> Doc:
    """The document a corpus key names on this machine (its file may be absent)."""
    source, _, rel = key.partition("/")
    if source == "gcide":
        return Doc(key, "gcide", str(GCIDE_DICT))
    root = {"pydoc": PYDOC_ROOT, "doc": DOC_ROOT, "stdlib": stdlib_root() or Path("/usr/lib/python3.11")}.get(source)
    if root is None or not rel:
        raise ValueError(f"not a corpus key: {key!r}")
    return Doc(key, source, str(root / rel))


def _origin(key: str) -> str:
    """Where a key's text comes from, as the manifest's "packages" names it: "pydoc", "gcide" or "doc/<folder>"."""
    source, _, rel = key.partition("/")
    return f"doc/{rel.split('/', 1)[0]}" if source == "doc" else source


def _install_hint(key: str, manifest: dict) -> str:
    if key.startswith("stdlib/"):
        return (f"the standard library of CPython {manifest.get('python', '3.11')} (the one running this: "
                f"{sys.version.split()[0]} at {stdlib_root()})")
    pkg = manifest.get("packages", {}).get(_origin(key))
    if not pkg:
        return f"the Debian package that installs {doc_for_key(key).path}"
    name, _, version = pkg.partition(" ")
    return f"apt-get install -y {name}={version} (Debian)"


def check_documents(docs: Sequence[Pinned], manifest: dict) -> tuple[list[str], list[str]]:
    """(texts, problems): each pinned document's cleaned text on this machine ('' where it is missing) and one
    line per document that is missing or differs from its pinned SHA-256."""
    texts, problems = [], []
    for p in docs:
        doc = doc_for_key(p.key)
        present = GCIDE_DICT.is_file() and GCIDE_INDEX.is_file() if doc.source == "gcide" else \
            Path(doc.path).is_file()
        text = read_document(doc) if present else ""
        texts.append(text)
        where = f"{p.key} ({doc.path})"
        if not present or not text:
            problems.append(f"{where}: missing; install: {_install_hint(p.key, manifest)}")
        elif hashlib.sha256(text.encode("utf-8")).hexdigest() != p.sha256:
            problems.append(f"{where}: sha256 differs from the pinned one (another version?); pinned from: "
                            f"{_install_hint(p.key, manifest)}")
    return texts, problems


def pinned_texts(max_bytes: int | None = None, strict: bool | None = None,
                 manifest: str | os.PathLike | dict | None = None, sources: Sequence[str] = SOURCES) -> list[str]:
    """The held-out texts the manifest pins, in its order, until ``max_bytes`` bytes (the document crossing it
    included: the same prefix as ``iter_texts("heldout", max_bytes)`` on the machine that wrote the manifest).
    Every document used is checked first. ``strict`` (default: unless LONGLENS_HAYSTACKS=warn): raise
    HaystackError on a missing or different document; otherwise warn and use what this machine has.
    ``manifest``: a path or a loaded manifest (default MANIFEST). ``sources``: only documents of these sources
    (one kind of text: stdlib = source code, pydoc = manuals, doc = package documentation, gcide = a
    dictionary), in the manifest's order."""
    source = "the given manifest" if isinstance(manifest, dict) else Path(manifest or MANIFEST)
    man = manifest if isinstance(manifest, dict) else load_manifest(source)
    if strict is None:
        strict = os.environ.get("LONGLENS_HAYSTACKS", "").lower() != "warn"
    docs, total = [], 0
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise ValueError(f"haystack sources must be among {SOURCES}, got {list(sources)}")
    for p in man["documents"]:
        if max_bytes is not None and total >= max_bytes:
            break
        if p.key.split("/", 1)[0] not in sources:
            continue
        docs.append(p)
        total += p.nbytes
    texts, problems = check_documents(docs, man)
    if problems:
        head = (f"{len(problems)} of the {len(docs)} held-out haystack documents this needs are not the ones "
                f"pinned in {source}, so the haystacks (and the numbers) would differ from the published "
                f"ones:\n  ")
        body = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        if strict:
            raise HaystackError(head + body + "\nInstall them, pass your own files (--haystack PATH), or set "
                                "LONGLENS_HAYSTACKS=warn to go on with this machine's text.")
        warnings.warn(head + body + "\nGoing on with this machine's text (LONGLENS_HAYSTACKS=warn).", stacklevel=2)
    return [t for t in texts if t.strip()]


def _packages(keys: Iterable[str]) -> dict[str, str]:
    """{origin (_origin): "package version"} of the Debian packages the documents come from (dpkg-query)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\n"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    versions = dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)
    pkgs = {}
    for origin in sorted({_origin(k) for k in keys if not k.startswith("stdlib/")}):
        name = _INSTALL.get(origin) or origin.split("/", 1)[1]
        if name not in versions:  # a folder named otherwise than its package
            owner = subprocess.run(["dpkg", "-S", str(DOC_ROOT / name)], capture_output=True, text=True).stdout
            name = owner.split(":")[0].strip()
        if name in versions:
            pkgs[origin] = f"{name} {versions[name]}"
    return pkgs


def write_manifest(path: str | os.PathLike = MANIFEST) -> dict:
    """Pin this machine's held-out documents (all of them, in iteration order) to ``path``."""
    docs = [(d.key, len(t.encode("utf-8")), hashlib.sha256(t.encode("utf-8")).hexdigest())
            for d, t in iter_documents("heldout")]
    head = {"about": "Held-out haystack documents of python -m runtime eval, pinned: corpus key, UTF-8 bytes and "
                     "SHA-256 of the cleaned text, in iteration order (runtime/haystacks.py). Written by "
                     "python -m runtime.haystacks --write-manifest.",
            "python": sys.version.split()[0], "packages": _packages(k for k, _, _ in docs)}
    lines = json.dumps(head, indent=1)[:-2] + ',\n "documents": [\n'
    lines += ",\n".join("  " + json.dumps(list(d)) for d in docs) + "\n ]\n}\n"
    Path(path).write_text(lines)
    return load_manifest(path)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m runtime.haystacks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="verify every pinned held-out document on this machine")
    ap.add_argument("--write-manifest", action="store_true", help=f"pin this machine's held-out documents ({MANIFEST})")
    args = ap.parse_args(argv)
    if args.write_manifest:
        man = write_manifest()
        print(f"wrote {MANIFEST}: {len(man['documents'])} documents, "
              f"{sum(p.nbytes for p in man['documents']):,} bytes")
        return 0
    if args.check:
        man = load_manifest()
        _, problems = check_documents(man["documents"], man)
        print("\n".join(problems) or f"all {len(man['documents'])} pinned held-out documents match")
        return 1 if problems else 0
    print("stdlib root:", stdlib_root())
    print(json.dumps(corpus_stats(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
