"""Test helper: what several test modules share that is not a fixture (the fixtures are in conftest.py):
corpus files to load, waiting on a condition with a deadline, archive and PDF bytes for hostile inputs,
and the app served in this process with a gradio_client to drive it. Test modules import from here (or
from hf_oracle.py and live_server.py), never from one another."""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
SHIPPED = ASSETS / "model"
NEEDLE = "the secret launch code is 7421"
QUESTION = "What is the secret launch code?"


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll `condition` until it is true or `timeout` seconds have passed; whether it became true.
    For state another process or thread changes without telling us (a file appearing, a session released,
    a streamed piece arriving): the caller asserts on the result with its own message."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


# ------------------------------------------------------------------------------------ corpus files
def write_corpus(folder: Path, lines: int = 24, needle_at: tuple[str, int] | None = ("b.txt", 17)) -> list[Path]:
    """Three small text files; the needle replaces line `needle_at[1]` of file `needle_at[0]`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, word in (("a.txt", "apple"), ("b.txt", "river"), ("c.md", "stone")):
        text = [f"{word} note {i}: nothing to see here" for i in range(1, lines + 1)]
        if needle_at and needle_at[0] == name:
            text[needle_at[1] - 1] = NEEDLE
        (folder / name).write_text("\n".join(text) + "\n")
        paths.append(folder / name)
    return paths


def write_files(folder: Path, specs: dict[str, str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text in specs.items():
        (folder / name).write_text(text)
        out.append(folder / name)
    return out


def lines(word: str, n: int = 24, needle_at: int | None = None) -> str:
    rows = [f"{word} note {i}: nothing to see here" for i in range(1, n + 1)]
    if needle_at:
        rows[needle_at - 1] = NEEDLE
    return "\n".join(rows) + "\n"


def drain(gen):
    """A session's ask() generator run to its end: (the pieces streamed, the Answer)."""
    from runtime.engine import Piece

    pieces, answer = [], None
    for ev in gen:
        if isinstance(ev, Piece):
            pieces.append(ev)
        else:
            answer = ev
    return pieces, answer


# ------------------------------------------------------------------------------------ archives and PDFs
def make_pdf(content: bytes | None) -> bytes:
    """A minimal one-page PDF; `content` is the page's content stream (None: no text layer)."""
    page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >>"
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            page + (b" /Contents 5 0 R >>" if content is not None else b" >>"),
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    if content is not None:
        objs.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, obj)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


HELLO_PDF = make_pdf(b"BT /F1 12 Tf 72 720 Td (Hello PDF world) Tj 0 -16 Td (Second line) Tj ET")


def encrypt_pdf(data: bytes, user: str) -> bytes:
    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user, owner_password="owner", algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def zip_bytes(entries: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(entries: list, mode: str = "w:gz") -> bytes:
    """entries: (name, bytes) for files or (name, TarInfo type, linkname) for special members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, *rest in entries:
            info = tarfile.TarInfo(name)
            if len(rest) == 1:
                info.size = len(rest[0])
                tf.addfile(info, io.BytesIO(rest[0]))
            else:
                info.type, info.linkname = rest
                tf.addfile(info)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ the app in this process
def launch_app(model_dir, snapshot_dir, **over):
    """Build and launch the app as launch.py does; returns (demo, url)."""
    from app import Settings, build_demo
    from live_server import free_port

    settings = Settings(model_dir=model_dir, snapshot_dir=snapshot_dir, **{
        "max_file_bytes": 64 << 10, "max_sessions": 2, "chunk_size": 256, **over})
    demo, launch_kwargs = build_demo(settings)
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=64)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            max_file_size=settings.max_file_bytes, **launch_kwargs)
    return demo, url


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def load(c, paths):
    from gradio_client import handle_file

    return c.predict([handle_file(str(p)) for p in paths], api_name="/load_files")


def ask(c, question=QUESTION, max_new_tokens=6):
    return c.predict(question, max_new_tokens, 0.0, -1, api_name="/ask")


def text_of(message) -> str:
    """A gradio 6 chat message's text (content is a list of parts)."""
    c = message["content"]
    return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if isinstance(p, dict))


def call_raw(url: str, api_name: str, data: list, session_hash: str, cookies=None) -> list:
    """One call through gradio's plain HTTP API (POST, then read the event stream): its final outputs."""
    import httpx

    r = httpx.post(f"{url}gradio_api/call/{api_name}", json={"data": data, "session_hash": session_hash},
                   cookies=cookies, timeout=30)
    r.raise_for_status()
    event, last = r.json()["event_id"], None
    with httpx.stream("GET", f"{url}gradio_api/call/{api_name}/{event}", cookies=cookies, timeout=60) as s:
        kind = None
        for line in s.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "generating"):
                last = json.loads(line[5:])
            if kind in ("complete", "error") and line.startswith("data:"):
                if kind == "error":
                    raise RuntimeError(f"error event: {line}")
                break
    return last
