"""Tests for runtime.corpus: ingestion of every format, hostile inputs, and the token layout."""
import io
import json
import os
import re
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import HELLO_PDF, encrypt_pdf, make_pdf, tar_bytes, zip_bytes

from runtime import corpus as C
from runtime.corpus import CorpusError, Layout, Limits, ingest

SMALL = Limits(max_file_bytes=1 << 20, max_total_bytes=2 << 20, max_files=50)


def write(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def by_name(corpus):
    return {d.name: d for d in corpus.documents}, {s.name: s.reason for s in corpus.skipped}


def words(text):
    """Fake tokenizer: one token per whitespace-separated word, with char offsets."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    return [e - s for s, e in spans], spans


# ----------------------------------------------------------------------------- formats

def test_every_format_in_a_folder(tmp_path):
    d = tmp_path / "proj"
    write(d, "README.md", b"# Title\r\n\r\nSome *markdown*.\r\n")
    write(d, "docs/guide.rst", b"Guide\n=====\n\nText.\n")
    write(d, "src/main.py", b"def main():\n    return 42\n")
    write(d, "data/table.csv", b"a,b\n1,2\n")
    write(d, "data/conf.json", b'{"k": [1, 2]}')
    write(d, "notes.txt", b"plain text\n")
    write(d, "LICENSE", b"MIT\n")
    write(d, "page.html", b"<html><head><title>T</title><style>body{color:red}</style>"
                          b"<script>var x = '<p>no</p>';</script></head><body><h1>Heading</h1>"
                          b"<p>First &amp; para</p><div>Second<br>line</div><ul><li>one</li><li>two</li></ul>"
                          b"<pre>code\n    indented</pre></body></html>")
    write(d, "paper.pdf", HELLO_PDF)
    write(d, ".git/config", b"[core]\n")
    write(d, "src/__pycache__/main.cpython-311.pyc", b"\x00\x01binary")
    corpus = ingest([str(d)])
    docs, skipped = by_name(corpus)
    p = str(d)
    assert [n[len(p) + 1:] for n in docs] == ["LICENSE", "README.md", "data/conf.json", "data/table.csv",
                                             "docs/guide.rst", "notes.txt", "page.html", "paper.pdf", "src/main.py"]
    kinds = {n[len(p) + 1:]: d.kind for n, d in docs.items()}
    assert kinds == {"LICENSE": "text", "README.md": "markdown", "data/conf.json": "json", "data/table.csv": "csv",
                     "docs/guide.rst": "rst", "notes.txt": "text", "page.html": "html", "paper.pdf": "pdf",
                     "src/main.py": "code"}
    assert docs[f"{p}/README.md"].text == "# Title\n\nSome *markdown*.\n"
    html = docs[f"{p}/page.html"].text
    assert "color" not in html and "var x" not in html
    assert html.splitlines() == ["T", "", "Heading", "", "First & para", "", "Second", "line", "", "one", "two", "",
                                 "code", "    indented"]
    assert "Hello PDF world" in docs[f"{p}/paper.pdf"].text and "Second line" in docs[f"{p}/paper.pdf"].text
    assert skipped == {}
    assert corpus.total_chars == sum(len(x.text) for x in corpus.documents)


def test_pdf_edge_cases(tmp_path):
    ok = write(tmp_path, "ok.txt", b"fine")
    scanned = write(tmp_path, "scan.pdf", make_pdf(None))
    locked = write(tmp_path, "locked.pdf", encrypt_pdf(HELLO_PDF, "secret"))
    owner_only = write(tmp_path, "owner_only.pdf", encrypt_pdf(HELLO_PDF, ""))
    broken = write(tmp_path, "broken.pdf", b"%PDF-1.4\nnot really")
    docs, skipped = by_name(ingest([ok, scanned, locked, owner_only, broken]))
    assert "no text layer" in skipped[scanned]
    assert "encrypted" in skipped[locked]
    assert "unreadable PDF" in skipped[broken]
    assert "Hello PDF world" in docs[owner_only].text
    with pytest.raises(CorpusError, match="encrypted"):
        ingest([locked])


def test_encodings_and_binary(tmp_path):
    french = "Le café est très bon. Les élèves étudient à l'école, où l'on parle français.\n" * 3
    files = {
        "empty.txt": b"",
        "blank.txt": b" \n\t\n",
        "image.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
        "nul.txt": b"text\x00with nul",
        "ctrl.bin": bytes(range(1, 32)) * 20,
        "bad_utf8.txt": b"hello \xc3\x28 world \xff ok",
        "mostly_utf8.txt": "naïve café résumé déjà vu ".encode() * 4 + b"\xff stray",
        "latin1.txt": french.encode("latin-1"),
        "utf16.txt": "UTF-16 text: ünïcödé\r\nline 2".encode("utf-16"),
        "utf16be.txt": codecs_bom_be("big endian"),
        "bom.py": b"\xef\xbb\xbfprint('bom')\n",
    }
    paths = {n: write(tmp_path, n, b) for n, b in files.items()}
    docs, skipped = by_name(ingest(list(paths.values())))
    assert skipped[paths["empty.txt"]] == "empty"
    assert "whitespace" in skipped[paths["blank.txt"]]
    assert "binary" in skipped[paths["image.png"]] and "NUL" in skipped[paths["nul.txt"]]
    assert "binary" in skipped[paths["ctrl.bin"]]
    bad = docs[paths["bad_utf8.txt"]].text
    assert bad.startswith("hello ") and bad.endswith(" ok")
    assert docs[paths["mostly_utf8.txt"]].text.startswith("naïve café résumé")
    assert docs[paths["latin1.txt"]].text == french
    assert docs[paths["utf16.txt"]].text == "UTF-16 text: ünïcödé\nline 2"
    assert docs[paths["utf16be.txt"]].text == "big endian"
    assert docs[paths["bom.py"]].text == "print('bom')\n"


def codecs_bom_be(s: str) -> bytes:
    return b"\xfe\xff" + s.encode("utf-16-be")


def test_single_huge_line(tmp_path):
    path = write(tmp_path, "one_line.txt", b"x" * (5 << 20))
    corpus = ingest([path])
    assert len(corpus.documents[0].text) == 5 << 20
    layout = Layout.build(corpus, words)
    (span,) = layout.locate(0, len(layout.ids))
    assert (span.line_start, span.line_end) == (1, 1) and len(span.snippet) == C.SNIPPET_CHARS + 1


# ----------------------------------------------------------------------------- archives

def test_nested_archives_and_names(tmp_path):
    deepest = zip_bytes({"b.txt": b"too deep"})
    inner = tar_bytes([("a.txt", b"inner text"), ("deep.zip", deepest)])
    outer = write(tmp_path, "outer.zip", zip_bytes({"dir/inner.tar.gz": inner, "top.md": b"# top",
                                                    ".git/HEAD": b"ref", "dir/": b""}))
    docs, skipped = by_name(ingest([outer]))
    assert set(docs) == {f"{outer}/dir/inner.tar.gz/a.txt", f"{outer}/top.md"}
    assert "max_archive_depth=2" in skipped[f"{outer}/dir/inner.tar.gz/deep.zip"]
    assert docs[f"{outer}/top.md"].kind == "markdown"


@pytest.mark.parametrize("fmt", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_compressions(tmp_path, fmt):
    ext = {"w": ".tar", "w:gz": ".tar.gz", "w:bz2": ".tar.bz2", "w:xz": ".tar.xz"}[fmt]
    path = write(tmp_path, "repo" + ext, tar_bytes([("./repo/x.py", b"x = 1\n")], fmt))
    assert ingest([path]).documents[0].name == f"{path}/repo/x.py"


def test_zip_bomb_and_limits(tmp_path):
    bomb = zip_bytes({"zeros.txt": b"0" * (5 << 20), "ok.txt": b"fine"})
    assert len(bomb) < 50_000
    path = write(tmp_path, "bomb.zip", bomb)
    docs, skipped = by_name(ingest([path], SMALL))
    assert skipped[f"{path}/zeros.txt"] == "larger than max_file_bytes=1 MB" and f"{path}/ok.txt" in docs
    many = write(tmp_path, "many.zip", zip_bytes({f"f{i}.txt": b"a" * (800 << 10) for i in range(4)}))
    with pytest.raises(CorpusError, match=r"many\.zip.*max_total_bytes=2 MB"):
        ingest([many], SMALL)
    tbomb = write(tmp_path, "bomb.tar.gz", tar_bytes([("zeros.txt", b"0" * (5 << 20)), ("ok.txt", b"fine")]))
    docs, skipped = by_name(ingest([tbomb], SMALL))
    assert "max_file_bytes" in skipped[f"{tbomb}/zeros.txt"] and f"{tbomb}/ok.txt" in docs
    files = write(tmp_path, "files.zip", zip_bytes({f"f{i}.txt": b"a" for i in range(60)}))
    with pytest.raises(CorpusError, match="max_files=50"):
        ingest([files], SMALL)
    entries = write(tmp_path, "entries.zip", zip_bytes({f"d{i}/": b"" for i in range(1001)}))
    with pytest.raises(CorpusError, match="1001 entries, over 20 x max_files=50"):
        ingest([entries], SMALL)


def test_zip_lying_about_its_size(tmp_path):
    data = bytearray(zip_bytes({"big.txt": b"y" * 100_000, "ok.txt": b"fine"}))
    for sig, field in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # declared uncompressed size of big.txt
        at = data.index(sig)
        data[at + field:at + field + 4] = (100).to_bytes(4, "little")
    path = write(tmp_path, "liar.zip", bytes(data))
    docs, skipped = by_name(ingest([path], SMALL))
    assert f"{path}/ok.txt" in docs and "corrupt" in skipped[f"{path}/big.txt"]


def test_unsafe_and_special_members(tmp_path):
    z = write(tmp_path, "evil.zip", zip_bytes({"../escape.txt": b"x", "/etc/abs.txt": b"x", "C:/win.txt": b"x",
                                               "good.txt": b"good"}))
    docs, skipped = by_name(ingest([z]))
    assert list(docs) == [f"{z}/good.txt"]
    assert all("unsafe path" in r for r in skipped.values()) and len(skipped) == 3
    t = write(tmp_path, "evil.tar", tar_bytes([("link", tarfile.SYMTYPE, "/etc/passwd"),
                                               ("hard", tarfile.LNKTYPE, "good.txt"),
                                               ("dev", tarfile.CHRTYPE, ""), ("fifo", tarfile.FIFOTYPE, ""),
                                               ("a/../../up.txt", b"x"), ("good.txt", b"good")], "w"))
    docs, skipped = by_name(ingest([t]))
    assert list(docs) == [f"{t}/good.txt"]
    assert skipped[f"{t}/link"] == "symlink in archive" and skipped[f"{t}/hard"] == "hard link in archive"
    assert "special" in skipped[f"{t}/dev"] and "special" in skipped[f"{t}/fifo"]
    assert "unsafe" in skipped[f"{t}/a/../../up.txt"]
    sym = zipfile.ZipInfo("zlink")
    sym.create_system, sym.external_attr = 3, (0o120777 << 16)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(sym, "/etc/passwd")
        zf.writestr("good.txt", "good")
    zs = write(tmp_path, "sym.zip", buf.getvalue())
    assert by_name(ingest([zs]))[1] == {f"{zs}/zlink": "symlink in archive"}


def test_malformed_and_truncated_archives(tmp_path):
    bad = write(tmp_path, "bad.zip", b"PK\x03\x04 this is not a zip")
    with pytest.raises(CorpusError, match=r"bad\.zip: malformed zip archive"):
        ingest([bad])
    badtar = write(tmp_path, "bad.tar.gz", b"\x1f\x8b garbage")
    with pytest.raises(CorpusError, match="malformed tar"):
        ingest([badtar])
    full = tar_bytes([("a.txt", b"a" * 3000), ("b.txt", os.urandom(30000).hex().encode())], "w")
    cut = write(tmp_path, "cut.tar", full[:6000])
    docs, skipped = by_name(ingest([cut]))
    assert f"{cut}/a.txt" in docs and "truncated" in skipped[cut]
    ok = write(tmp_path, "ok.txt", b"ok")
    nested_bad = write(tmp_path, "outer.zip", zip_bytes({"inner.zip": b"junk"}))
    assert "malformed zip" in by_name(ingest([ok, nested_bad]))[1][f"{nested_bad}/inner.zip"]


# ----------------------------------------------------------------------------- errors

def test_errors(tmp_path, monkeypatch):
    with pytest.raises(CorpusError, match="nope.txt: no such file"):
        ingest([str(tmp_path / "nope.txt")])
    with pytest.raises(CorpusError, match="no input"):
        ingest([])
    b1 = write(tmp_path, "a.bin", b"\x00\x01\x02")
    b2 = write(tmp_path, "b.txt", b"")
    with pytest.raises(CorpusError, match=r"no readable documents.*a\.bin: binary.*b\.txt: empty"):
        ingest([b1, b2])
    big = write(tmp_path, "big.txt", b"z" * 2000)
    with pytest.raises(CorpusError, match="max_file_bytes=1000 bytes"):
        ingest([big], Limits(max_file_bytes=1000))
    with pytest.raises(CorpusError, match="max_total_bytes"):
        ingest([big, write(tmp_path, "big2.txt", b"z" * 2000)], Limits(max_total_bytes=3000))
    if os.geteuid() != 0:
        locked = write(tmp_path, "locked.txt", b"x")
        os.chmod(locked, 0)
        with pytest.raises(CorpusError, match="locked.txt: unreadable"):
            ingest([locked])
    # a file that disappears between listing and reading
    d = tmp_path / "dir"
    write(d, "keep.txt", b"keep")
    gone = write(d, "gone.txt", b"gone")
    real_open = open
    monkeypatch.setattr(C, "open", lambda p, *a: (_ for _ in ()).throw(FileNotFoundError(p)) if p == gone
                        else real_open(p, *a), raising=False)
    docs, skipped = by_name(ingest([str(d)]))
    assert skipped == {gone: "vanished while reading"} and list(docs) == [str(d / "keep.txt")]


def test_folder_symlinks_and_duplicates(tmp_path):
    d = tmp_path / "f"
    target = write(tmp_path, "outside.txt", b"secret")
    write(d, "a.txt", b"a")
    os.symlink(target, d / "link.txt")
    docs, skipped = by_name(ingest([str(d) + "/", str(d / "a.txt"), str(d / "a.txt")]))
    assert list(docs) == [f"{d}/a.txt"]  # the explicit path equals the folder-derived name: a duplicate
    assert skipped == {f"{d}/link.txt": "symlink (not followed)", f"{d}/a.txt": "duplicate"}


# ----------------------------------------------------------------------------- layout

def test_layout_locate_and_json(tmp_path):
    a = write(tmp_path, "a.py", b"alpha beta\ngamma\n\ndelta epsilon\n")
    b = write(tmp_path, "b.md", b"one\ntwo three\n")
    corpus = ingest([a, b])
    layout = Layout.build(corpus, words)
    da, db = layout.documents
    header = len(words(f"### File: {a}\n")[0])
    assert (da.token_start, da.text_start - da.token_start, da.text_end - da.text_start) == (0, header, 5)
    assert da.token_end == da.text_end == db.token_start  # words() makes no tokens for "\n\n"
    assert db.token_end == len(layout.ids) == len(layout.lines) and (da.n_lines, db.n_lines) == (4, 2)
    assert list(layout.lines[da.text_start:da.text_end]) == [1, 1, 2, 4, 4]
    assert layout.doc_at(0) == 0 and layout.doc_at(db.text_start) == 1
    with pytest.raises(IndexError):
        layout.doc_at(len(layout.ids))
    t = da.text_start
    (s,) = layout.locate(t + 2, t + 4)  # "gamma", "delta"
    assert (s.name, s.line_start, s.line_end, s.snippet) == (a, 2, 4, "gamma\n\ndelta epsilon")
    s1, s2 = layout.locate(t + 4, db.text_start + 2)  # spans both documents, including b's header
    assert (s1.name, s1.line_start, s1.line_end, s1.snippet) == (a, 4, 4, "delta epsilon")
    assert (s2.name, s2.line_start, s2.line_end, s2.snippet) == (b, 1, 2, "one\ntwo three")
    assert layout.locate(0, 2) == [C.Span(a, 0, 0, "")]  # header only
    assert layout.locate(5, 5) == [] and layout.locate(-10, 10**9)[-1].line_end == 2
    restored = Layout.from_json(layout.to_json())
    assert list(restored.ids) == list(layout.ids) and restored.documents == layout.documents
    assert restored.locate(t + 2, t + 4) == layout.locate(t + 2, t + 4)
    for junk in ("{", "[]", '{"version": 2}', json.dumps({**json.loads(layout.to_json()), "ids": "!!"})):
        with pytest.raises(CorpusError, match="malformed layout snapshot"):
            Layout.from_json(junk)


def test_layout_real_separator_tokens():
    corpus = C.Corpus([C.Document("x", "a\nb", "text"), C.Document("y", "c", "text")])

    def chars(text):  # one token per character, separators included
        return [ord(c) for c in text], [(i, i + 1) for i in range(len(text))]
    layout = Layout.build(corpus, chars)
    dx, dy = layout.documents
    assert dx.token_end - dx.text_end == 2 and layout.ids[dx.text_end:dx.token_end].tolist() == [10, 10]
    assert [s.name for s in layout.locate(dx.text_end, dy.text_start)] == ["y"]  # separator ignored, header -> 0
    assert layout.locate(dx.text_end, dx.token_end) == []
    assert layout.locate(dx.text_start, dx.text_end)[0].snippet == "a\nb"


# ----------------------------------------------------------------------------- scale and fuzz

def test_python_stdlib_sample():
    lib = Path(json.__file__).parents[1]
    dirs = [str(lib / d) for d in ("json", "email", "http", "xml", "importlib", "asyncio", "urllib", "html",
                                  "concurrent", "wsgiref", "logging", "sqlite3", "zoneinfo", "tomllib")]
    corpus = ingest([d for d in dirs if os.path.isdir(d)])
    assert len(corpus.documents) >= 150 and {d.kind for d in corpus.documents} <= {"code", "rst", "text"}
    assert {s.reason for s in corpus.skipped} <= {"empty"}  # empty __init__.py files
    layout = Layout.build(corpus, words)
    doc = layout.documents[len(layout.documents) // 2]
    (span,) = layout.locate(doc.text_start, doc.text_end)
    assert span.line_start == 1 and span.line_end <= doc.n_lines


member_names = st.sampled_from(["x.txt", "sub/y.md", "../up.txt", "/abs.txt", "a/../../b", "inner.zip",
                                "inner.tar", "C:/win.txt", ".git/z", "d.pdf", "e.html", "", "."])
payloads = st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                     st.sampled_from([HELLO_PDF, zip_bytes({"n.txt": b"nested"}), b"%PDF-1.4 junk"]))


@st.composite
def archives(draw):
    kind = draw(st.sampled_from(["zip", "tar", "tar.gz", "tar.bz2"]))
    members = draw(st.lists(st.tuples(member_names, payloads,
                                      st.sampled_from(["file", "file", "symlink", "hardlink", "dir"])), max_size=5))
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data, typ in members:
                info = zipfile.ZipInfo(name or "x")
                if typ == "symlink":
                    info.create_system, info.external_attr = 3, 0o120777 << 16
                zf.writestr(info, data)
        data = buf.getvalue()
    else:
        data = tar_bytes([(n, d) if t == "file" else (n, {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                                                          "dir": tarfile.DIRTYPE}[t], "x.txt")
                          for n, d, t in members], "w" if kind == "tar" else f"w:{kind[4:]}")
    cut = draw(st.integers(0, len(data)))  # sometimes truncate or corrupt
    how = draw(st.sampled_from(["keep", "keep", "truncate", "flip"]))
    if how == "truncate":
        data = data[:cut]
    elif how == "flip" and data:
        data = data[:cut] + bytes([data[cut % len(data)] ^ 0xFF]) + data[cut + 1:]
    return f"a.{kind}", data


files = st.one_of(st.tuples(st.sampled_from(["r.txt", "r.pdf", "r.html", "r.zip", "r.tar.gz", "r.json", "r"]),
                            payloads), archives())


@pytest.mark.filterwarnings("ignore:Duplicate name")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(files, min_size=1, max_size=3))
def test_fuzz_only_corpus_errors(inputs):
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write(Path(tmp), f"{i}/{name}", data) for i, (name, data) in enumerate(inputs)]
        try:
            corpus = ingest(paths, Limits(max_file_bytes=4000, max_total_bytes=20000, max_files=12))
        except CorpusError as e:
            assert str(e)
            return
        assert corpus.documents and all(isinstance(d.text, str) and "\r" not in d.text for d in corpus.documents)
        layout = Layout.build(corpus, words)
        assert Layout.from_json(layout.to_json()).locate(0, len(layout.ids)) == layout.locate(0, len(layout.ids))
