"""Corpus ingestion and token layout for Longlens (pure: no torch, no gradio).

``ingest(paths, limits)`` turns files, folders and zip/tar archives into a
``Corpus``: text ``Document``s plus ``Skipped`` inputs with a reason each.
Archives are read in memory and never written to disk; member names are checked
(no ``..``, no absolute paths), links and devices are skipped, and sizes are
bounded both by the sizes an archive declares and by the bytes actually read.
Hard failures (missing path, unreadable input, malformed top-level archive, a
corpus-wide limit exceeded, nothing readable at all) raise ``CorpusError``.

``Layout.build(corpus, encode)`` concatenates the documents into one token
sequence (``### File: {name}\\n`` + text + ``\\n\\n`` per document, each part
encoded separately) and keeps a line number per token, so ``Layout.locate``
maps any token range back to file lines.
"""
from __future__ import annotations

import base64
import bisect
import codecs
import io
import json
import lzma
import os
import re
import stat
import struct
import sys
import tarfile
import zipfile
import zlib
from array import array
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Callable, Sequence

import charset_normalizer
import pypdf

from .errors import CorpusError

MB = 1 << 20
SNIPPET_CHARS = 200


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 50 * MB     # one document; larger ones are skipped
    max_total_bytes: int = 200 * MB   # whole corpus (and one archive file); exceeding it is an error
    max_files: int = 5000             # files seen, archive members included; exceeding it is an error
    max_archive_depth: int = 2        # 2 = an archive inside an archive is still opened


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    kind: str  # text, markdown, rst, code, csv, json, html, pdf


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass
class Corpus:
    documents: list[Document] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def total_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)


_KINDS = {".md": "markdown", ".markdown": "markdown", ".rst": "rst", ".txt": "text", ".text": "text",
          ".log": "text", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
          ".ndjson": "json", ".html": "html", ".htm": "html", ".xhtml": "html", ".pdf": "pdf"}
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
_SKIP_DIRS = {"__pycache__", "node_modules"}  # plus every hidden (dot) directory
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError,
                   NotImplementedError, RuntimeError, ValueError, struct.error, OverflowError, KeyError)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_NONBLANK = re.compile(r"\S")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f\ufffd]")
_NEWLINE = re.compile("\n")


def _kind(name: str) -> str:
    ext = os.path.splitext(name.rsplit("/", 1)[-1])[1].lower()
    return _KINDS.get(ext, "code" if ext else "text")


def _archive_kind(name: str) -> str | None:
    low = name.lower()
    return "zip" if low.endswith(".zip") else "tar" if low.endswith(_TAR_SUFFIXES) else None


def _fmt(n: int) -> str:
    return f"{n / MB:g} MB" if n >= MB else f"{n} bytes"


def _short(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return msg[:200]


def _decode(data: bytes) -> tuple[str | None, str]:
    """Bytes -> (text, "") or (None, reason). BOM, then UTF-8, then charset-normalizer."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding, "replace"), ""
    if b"\x00" in data:
        return None, "binary (contains NUL bytes)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        text = data.decode("utf-8", "replace")
        bad = text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
        valid_non_ascii = len(text) - len(text.encode("ascii", "ignore")) - bad
        if valid_non_ascii < 4 * bad:  # not "UTF-8 with a few stray bytes": sniff around the first bad byte
            matches = charset_normalizer.from_bytes(data[max(0, e.start - 32768):e.start + 32768])
            if not matches:
                return None, "binary (no text encoding detected)"
            best = matches[0]  # it breaks ties arbitrarily (cp1250 for French): prefer Western on a tie
            best = next((m for m in matches if m.encoding == "cp1252" and m.chaos <= best.chaos), best)
            text = data.decode(best.encoding, "replace")
    sample = text[:65536]
    if len(_CONTROL.findall(sample)) > len(sample) // 20:
        return None, "binary (control characters)"
    return text, ""


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "svg"}
    LINE = {"br", "li", "dt", "dd", "tr", "option"}  # start a new line
    BLOCK = {"p", "div", "hr", "ul", "ol", "dl", "h1", "h2", "h3", "h4", "h5", "h6",
             "tr", "table", "section", "article", "header", "footer", "nav", "aside", "main", "blockquote",
             "figure", "figcaption", "form", "title", "pre", "body", "html", "head", "address", "details"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.pre += tag == "pre"
            self.out.append("\n")
        elif tag in self.LINE:
            self.out.append("\n")
        elif tag in ("td", "th"):
            self.out.append("\t")

    def handle_startendtag(self, tag, attrs):
        if tag in self.BLOCK or tag in self.LINE:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.pre = max(0, self.pre - (tag == "pre"))
            self.out.append("\n")

    def handle_data(self, data):
        if self.skip:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.out or self.out[-1].endswith("\n"):
                data = data.lstrip()
        self.out.append(data)


def _html_text(html: str) -> str:
    parser = _HTMLText()
    try:
        parser.feed(html)
        parser.close()
    except (AssertionError, ValueError, IndexError):  # html.parser is lenient; keep what it produced
        pass
    text = "\n".join(line.rstrip() for line in "".join(parser.out).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _pdf_text(data: bytes) -> tuple[str | None, str]:
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")  # owner-password-only PDFs open with an empty user password
            except Exception:
                opened = 0
            if not opened:
                return None, "encrypted PDF (password required)"
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # third-party parser on untrusted bytes: any failure means "unreadable"
        return None, f"unreadable PDF: {_short(e)}"
    text = "\n\n".join(p.strip("\n") for p in pages).encode("utf-8", "replace").decode("utf-8")  # lone surrogates
    if not _NONBLANK.search(text):
        return None, "PDF has no text layer (scanned images?)"
    return text, ""


class _Ingest:
    def __init__(self, limits: Limits) -> None:
        self.lim = limits
        self.corpus = Corpus()
        self.bytes = self.files = 0
        self.seen: set[str] = set()

    def skip(self, name: str, reason: str) -> None:
        self.corpus.skipped.append(Skipped(name, reason))

    def too_big(self, name: str, limit: str) -> None:
        self.skip(name, f"larger than {limit}={_fmt(getattr(self.lim, limit))}")

    def cap(self, name: str) -> tuple[int, str]:
        return ((self.lim.max_total_bytes, "max_total_bytes") if _archive_kind(name)
                else (self.lim.max_file_bytes, "max_file_bytes"))

    def path(self, given: str) -> None:
        try:
            st = os.stat(given)
        except FileNotFoundError:
            raise CorpusError(f"{given}: no such file or directory") from None
        except OSError as e:
            raise CorpusError(f"{given}: unreadable ({e.strerror or e})") from None
        if stat.S_ISDIR(st.st_mode):
            self.folder(given, given.rstrip("/" + os.sep) or given, top=True, depth=0)
        elif stat.S_ISREG(st.st_mode):
            self.disk_file(given, given, top=True)
        else:
            raise CorpusError(f"{given}: not a regular file or folder")

    def folder(self, path: str, name: str, top: bool, depth: int) -> None:
        if depth > 64:
            return self.skip(name, "folders nested too deeply")
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if top:
                raise CorpusError(f"{name}: unreadable folder ({e.strerror or e})") from None
            return self.skip(name, f"unreadable folder: {e.strerror or e}")
        for entry in entries:
            child = f"{name}/{entry.name}"
            try:
                if entry.is_symlink():
                    self.skip(child, "symlink (not followed)")
                elif entry.is_dir(follow_symlinks=False):
                    if not (entry.name.startswith(".") or entry.name in _SKIP_DIRS):
                        self.folder(entry.path, child, top=False, depth=depth + 1)
                elif entry.is_file(follow_symlinks=False):
                    self.disk_file(entry.path, child, top=False)
                else:
                    self.skip(child, "not a regular file (device, socket or fifo)")
            except FileNotFoundError:
                self.skip(child, "vanished while reading")

    def disk_file(self, path: str, name: str, top: bool) -> None:
        cap, limit = self.cap(name)
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > cap:
                    self.count(name)
                    return self.too_big(name, limit)
                data = f.read(cap + 1)
        except FileNotFoundError:
            return self.skip(name, "vanished while reading")
        except OSError as e:
            if top:
                raise CorpusError(f"{name}: unreadable ({e.strerror or e})") from None
            return self.skip(name, f"unreadable: {e.strerror or e}")
        if len(data) > cap:  # grew while we read it
            self.count(name)
            return self.too_big(name, limit)
        self.blob(name, data, depth=0, top=top)

    def count(self, name: str) -> None:
        self.files += 1
        if self.files > self.lim.max_files:
            raise CorpusError(f"{name}: more than max_files={self.lim.max_files} files")

    def blob(self, name: str, data: bytes, depth: int, top: bool) -> None:
        self.count(name)
        if name in self.seen:
            return self.skip(name, "duplicate")
        self.seen.add(name)
        kind = _archive_kind(name)
        if kind is None:
            return self.document(name, data)
        if depth >= self.lim.max_archive_depth:
            return self.skip(name, f"archive nested deeper than max_archive_depth={self.lim.max_archive_depth}")
        try:
            (self.zip if kind == "zip" else self.tar)(name, data, depth + 1)
        except CorpusError:
            raise
        except _ARCHIVE_ERRORS as e:
            if top:
                raise CorpusError(f"{name}: malformed {kind} archive ({_short(e)})") from None
            self.skip(name, f"malformed {kind} archive: {_short(e)}")

    def member(self, archive: str, raw: str) -> str | None:
        """Safe display name for an archive member, or None (unsafe: reported; hidden dir: ignored)."""
        norm = raw.replace("\\", "/")
        parts = [p for p in norm.split("/") if p not in ("", ".")]
        if norm.startswith("/") or re.match(r"[A-Za-z]:", norm) or ".." in parts or not parts:
            self.skip(f"{archive}/{raw}", "unsafe path in archive (absolute or '..')")
            return None
        if any(p.startswith(".") or p in _SKIP_DIRS for p in parts[:-1]):
            return None
        return f"{archive}/{'/'.join(parts)}"

    def zip(self, name: str, data: bytes, depth: int) -> None:
        end = getattr(zipfile, "_EndRecData", lambda f: None)(io.BytesIO(data))  # read the count before parsing
        if end and end[4] > 20 * self.lim.max_files:
            raise CorpusError(f"{name}: zip archive lists {end[4]} entries, over 20 x max_files={self.lim.max_files}")
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            todo = []
            for info in zf.infolist():
                if info.is_dir() or (member := self.member(name, info.filename)) is None:
                    continue
                mode = info.external_attr >> 16 if info.create_system == 3 else 0  # 3: Unix
                cap, limit = self.cap(member)
                if stat.S_ISLNK(mode):
                    self.skip(member, "symlink in archive")
                elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                    self.skip(member, "not a regular file (device or special file in archive)")
                elif info.flag_bits & 1:
                    self.skip(member, "encrypted archive entry")
                elif info.file_size > cap:
                    self.count(member)
                    self.too_big(member, limit)
                else:
                    todo.append((info, member, cap, limit))
            declared = sum(info.file_size for info, *_ in todo)
            if self.bytes + declared > self.lim.max_total_bytes:
                raise CorpusError(f"{name}: archive declares {_fmt(declared)} of files, corpus would exceed "
                                  f"max_total_bytes={_fmt(self.lim.max_total_bytes)}")
            for info, member, cap, limit in todo:
                try:
                    with zf.open(info) as f:
                        content = f.read(cap + 1)  # count real bytes: declared sizes can lie
                except _ARCHIVE_ERRORS as e:
                    self.skip(member, f"corrupt archive entry: {_short(e)}")
                    continue
                if len(content) > cap:
                    self.count(member)
                    self.too_big(member, limit)
                else:
                    self.blob(member, content, depth, top=False)

    def tar(self, name: str, data: bytes, depth: int) -> None:
        scanned = entries = 0  # tar is sequential: every member is decompressed, so bound all of them
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            try:
                for m in tf:
                    entries += 1
                    scanned += max(m.size, 0)
                    if entries > 20 * self.lim.max_files or scanned > 4 * self.lim.max_total_bytes:
                        raise CorpusError(f"{name}: tar archive expands beyond 4 x max_total_bytes="
                                          f"{_fmt(self.lim.max_total_bytes)} or 20 x max_files")
                    if m.isdir() or (member := self.member(name, m.name)) is None:
                        continue
                    cap, limit = self.cap(member)
                    if m.issym() or m.islnk():
                        self.skip(member, f"{'symlink' if m.issym() else 'hard link'} in archive")
                    elif not m.isreg():
                        self.skip(member, "not a regular file (device or special file in archive)")
                    elif m.size > cap:
                        self.count(member)
                        self.too_big(member, limit)
                    else:
                        self.blob(member, tf.extractfile(m).read(cap + 1), depth, top=False)
            except CorpusError:
                raise
            except _ARCHIVE_ERRORS as e:
                if not entries:
                    raise
                self.skip(name, f"archive truncated or corrupt at entry {entries}: {_short(e)}")

    def document(self, name: str, data: bytes) -> None:
        self.bytes += len(data)
        if self.bytes > self.lim.max_total_bytes:
            raise CorpusError(f"{name}: corpus exceeds max_total_bytes={_fmt(self.lim.max_total_bytes)}")
        if not data:
            return self.skip(name, "empty")
        kind = _kind(name)
        if kind == "pdf" or data.startswith(b"%PDF-"):
            kind = "pdf"
            text, why = _pdf_text(data)
        else:
            text, why = _decode(data)
            if text is not None and kind == "html":
                text = _html_text(text)
        if text is None:
            return self.skip(name, why)
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not _NONBLANK.search(text):
            return self.skip(name, "empty (whitespace only)")
        self.corpus.documents.append(Document(name, text, kind))


def ingest(paths: Sequence[str | os.PathLike], limits: Limits = Limits()) -> Corpus:
    """Read files, folders and archives into a Corpus (see module docstring)."""
    if not paths:
        raise CorpusError("no input files")
    job = _Ingest(limits)
    for p in paths:
        job.path(os.fspath(p))
    if not job.corpus.documents:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in job.corpus.skipped[:20])
        more = len(job.corpus.skipped) - 20
        raise CorpusError(f"no readable documents ({reasons}{f'; and {more} more' if more > 0 else ''})")
    return job.corpus


# --------------------------------------------------------------------------- token layout

Encode = Callable[[str], "tuple[Sequence[int], Sequence[tuple[int, int]]]"]


@dataclass(frozen=True)
class DocEntry:
    name: str
    token_start: int  # first header token
    token_end: int    # one past the trailing separator
    n_lines: int
    text_start: int   # first token of the document text
    text_end: int     # one past its last token


@dataclass(frozen=True)
class Span:
    name: str
    line_start: int  # 1-based, inclusive; 0..0 means only the "### File:" header was hit
    line_end: int
    snippet: str


def _line_starts(text: str) -> array:
    starts = array("q", [0])
    starts.extend(m.end() for m in _NEWLINE.finditer(text))
    if len(starts) > 1 and starts[-1] == len(text):
        starts.pop()
    return starts


def _pack(a: array) -> str:
    if sys.byteorder == "big":
        a = array(a.typecode, a)
        a.byteswap()
    return base64.b64encode(zlib.compress(a.tobytes(), 6)).decode("ascii")


def _unpack(s: str) -> array:
    a = array("i")
    a.frombytes(zlib.decompress(base64.b64decode(s, validate=True)))
    if sys.byteorder == "big":
        a.byteswap()
    return a


class Layout:
    """Token ids of the whole context with a line number per token (0 for header/separator tokens)."""

    def __init__(self, ids: array, lines: array, documents: list[DocEntry], texts: list[str]) -> None:
        self.ids, self.lines, self.documents, self.texts = ids, lines, documents, texts
        self._starts = [d.token_start for d in documents]
        self._line_cache: dict[int, array] = {}

    @classmethod
    def build(cls, corpus: Corpus, encode: Encode) -> Layout:
        ids, lines, docs = array("i"), array("i"), []
        sep = list(encode("\n\n")[0])
        layout = cls(ids, lines, docs, [d.text for d in corpus.documents])
        for i, doc in enumerate(corpus.documents):
            start = len(ids)
            header = list(encode(f"### File: {doc.name}\n")[0])
            body, offsets = encode(doc.text)
            if len(body) != len(offsets):
                raise ValueError(f"encode() gave {len(body)} ids but {len(offsets)} offsets for {doc.name}")
            starts = layout._line_cache[i] = _line_starts(doc.text)
            ids.extend(header)
            lines.extend([0] * len(header))
            text_start = len(ids)
            ids.extend(body)
            lines.extend(bisect.bisect_right(starts, o[0]) for o in offsets)
            text_end = len(ids)
            ids.extend(sep)
            lines.extend([0] * len(sep))
            docs.append(DocEntry(doc.name, start, len(ids), len(starts), text_start, text_end))
        layout._starts = [d.token_start for d in docs]
        return layout

    def doc_at(self, token: int) -> int:
        """Index into ``documents`` of the document holding ``token``; IndexError outside."""
        i = bisect.bisect_right(self._starts, token) - 1
        if token < 0 or i < 0 or token >= self.documents[i].token_end:
            raise IndexError(f"token {token} outside the layout (0..{len(self.ids)})")
        return i

    def locate(self, tok_start: int, tok_end: int) -> list[Span]:
        """File line ranges covered by tokens [tok_start, tok_end), one Span per document touched."""
        a, b = max(tok_start, 0), min(tok_end, len(self.ids))
        if a >= b:
            return []
        spans, i = [], self.doc_at(a)
        while i < len(self.documents) and self.documents[i].token_start < b:
            d = self.documents[i]
            lo, hi = max(a, d.text_start), min(b, d.text_end)
            if lo < hi:
                seg = self.lines[lo:hi]
                first, last = min(seg), max(seg)
                spans.append(Span(d.name, first, last, self._snippet(i, first, last)))
            elif a < d.text_start:
                spans.append(Span(d.name, 0, 0, ""))
            i += 1
        return spans

    def _snippet(self, i: int, first: int, last: int) -> str:
        if i not in self._line_cache:
            self._line_cache[i] = _line_starts(self.texts[i])
        starts, text = self._line_cache[i], self.texts[i]
        s = starts[first - 1]
        end = starts[last] - 1 if last < len(starts) else len(text)
        if end - s > SNIPPET_CHARS:
            return text[s:s + SNIPPET_CHARS] + "…"
        return text[s:end].rstrip("\n")

    def to_json(self) -> str:
        docs = [[d.name, d.token_start, d.token_end, d.n_lines, d.text_start, d.text_end] for d in self.documents]
        return json.dumps({"version": 1, "ids": _pack(self.ids), "lines": _pack(self.lines),
                           "documents": docs, "texts": self.texts}, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> Layout:
        try:
            o = json.loads(s)
            if o.get("version") != 1:
                raise ValueError(f"unknown version {o.get('version')!r}")
            ids, lines = _unpack(o["ids"]), _unpack(o["lines"])
            docs = [DocEntry(str(n), *(int(x) for x in rest)) for n, *rest in o["documents"]]
            texts = [str(t) for t in o["texts"]]
            if len(ids) != len(lines) or len(docs) != len(texts) or (docs and docs[-1].token_end != len(ids)):
                raise ValueError("inconsistent lengths")
        except (KeyError, TypeError, ValueError, AttributeError, zlib.error) as e:
            raise CorpusError(f"malformed layout snapshot: {_short(e)}") from None
        return cls(ids, lines, docs, texts)
