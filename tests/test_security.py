"""Isolation and access (issue 7, items 2 and 3): `--auth` guards the page and every API route alike; an
upload is readable by no one else (not through gradio's file route, not through the API); no path outside
is ever served or ingested; a session's files go when it ends; a restarted server shows nobody the previous
users' corpora; the limits are on the page and enforced.
"""

import os
import time
from pathlib import Path

import httpx
import pytest

from helpers import REPO, ask, call_raw, client, launch_app, lines, load, wait_until, write_files
from live_server import Server

PASSWD = "root:x:0:0"
APP_SETTINGS = {"max_sessions": 4}  # conftest's `app`


def refused(r: httpx.Response) -> bool:
    return r.status_code in (401, 403, 404) and PASSWD not in r.text


# ------------------------------------------------------------------------------------ --auth
@pytest.mark.slow
def test_auth_guards_the_page_and_the_api(tiny_model_dir, tmp_path):
    """`python launch.py --auth USER:PASS`: without credentials nothing is served but the login page, the API
    refuses every call, and a stranger cannot end a logged-in user's session through gradio's heartbeat route
    (the one route gradio leaves without a login check)."""
    from gradio_client import Client

    with Server(tiny_model_dir, tmp_path / "snaps", "--auth", "ann:secret-pw", temp_dir=tmp_path / "gradio") as s:
        url = s.url
        with pytest.raises(Exception, match="credentials were not provided"):
            Client(url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, verbose=False, auth=("ann", "wrong"))
        for path in ("config", "gradio_api/info", "gradio_api/openapi.json", "gradio_api/file=/etc/passwd",
                     f"gradio_api/file={s.private_dir}", "gradio_api/queue/data?session_hash=x"):
            assert httpx.get(url + path).status_code == 401, path
        for path, kw in (("gradio_api/upload", {"files": {"files": ("a.txt", b"hello")}}),
                         ("gradio_api/call/ask", {"json": {"data": ["hi", 4, 0.0, -1]}}),
                         ("gradio_api/run/ask", {"json": {"data": ["hi", 4, 0.0, -1]}}),
                         ("gradio_api/queue/join", {"json": {"data": [], "fn_index": 0, "session_hash": "x"}})):
            assert httpx.post(url + path, **kw).status_code == 401, path
        page = httpx.get(url)  # the login page: none of the app is in it
        assert page.status_code == 200 and '"auth_required":true' in page.text.replace(" ", "")
        assert "ll-drop" not in page.text and "ll-limits" not in page.text and "Limits" not in page.text
        assert not (s.snapshot_dir / ".sessions" / str(s.pid) / "uploads").exists()  # nothing was accepted

        c = Client(url, verbose=False, auth=("ann", "secret-pw"))
        assert "Corpus ready" in load(c, write_files(tmp_path / "c", {"mine.txt": lines("mine")}))[0]
        assert len(ask(c)[0]) == 2
        assert "ll-limits" in httpx.get(url, cookies=c.cookies).text  # logged in: the page itself
        with httpx.stream("GET", f"{url}gradio_api/heartbeat/{c.session_hash}", timeout=10) as r:
            assert r.status_code == 200  # gradio accepts it without a login...
            next(r.iter_lines())
        # ...and its disconnect fires the unload event for that session, which must be ignored: an absence,
        # with no event to wait on, so give it the time it takes to arrive (a heartbeat is 0.5 s here)
        time.sleep(2.5)
        chat, chips, _ = ask(c)
        assert len(chat) == 4 and "mine.txt" in chips  # the session, corpus and chat survived
        uploads = s.private_dir / "uploads"
        assert any(uploads.iterdir())
        c.close()  # the real user leaving (with its cookie) does end it: the files go
        assert wait_until(lambda: not any(uploads.iterdir()), 20), "the session's uploads were not removed"


# ------------------------------------------------------------------------------------ uploads
def test_an_upload_is_readable_by_no_one_else(app, tmp_path):
    demo, url = app
    files = demo.longlens.files
    a, b = client(url), client(url)
    secret = "the vault combination is 31-17-44"
    paths = write_files(tmp_path, {"a_private.txt": lines("alpha", needle_at=None) + secret + "\n"})
    assert "Corpus ready" in load(a, paths)[0]
    wa = demo.longlens.registry.peek(a.session_hash)
    ((served, private),) = wa.moved.items()  # where gradio put the upload, and where it is now
    assert Path(served).is_relative_to(os.environ["GRADIO_TEMP_DIR"]) and Path(private).is_relative_to(files.root)
    # gradio's file route serves anything in its upload folder to whoever has the URL: the file is gone from it
    assert not Path(served).exists() and not Path(served).parent.exists()
    assert not any(p.name == "a_private.txt" for p in Path(os.environ["GRADIO_TEMP_DIR"]).rglob("*"))
    for path in (served, private, *map(str, Path(wa.own_snapshots[0]).iterdir())):
        for route in ("gradio_api/file=", "gradio_api/file/"):
            r = httpx.get(f"{url}{route}{path}")
            assert refused(r) and secret not in r.text, (route, path, r.status_code)
    # another session naming A's upload as its own gets nothing of it (no such file, for it)
    data = {"path": served, "orig_name": "a_private.txt", "meta": {"_type": "gradio.FileData"}}
    status = call_raw(url, "load_files", [[data]], b.session_hash)[0]
    assert "cannot be used" in status and "no such file" in status
    assert demo.longlens.registry.peek(b.session_hash).docs == []
    # while A's page sending the same value again (a file added or removed beside it) still finds it
    status = call_raw(url, "load_files", [[data]], a.session_hash)[0]
    assert "Corpus ready" in status and "reused a snapshot" in status
    assert "a_private.txt" in a.predict("file:a_private.txt:25", api_name="/open_source")
    assert secret not in b.predict("file:a_private.txt:25", api_name="/open_source")  # B has no corpus at all


def test_a_fresh_upload_url_cannot_be_guessed(app):
    """Between gradio's upload route and the session reading the file, the file sits in gradio's upload
    folder, which gradio's file route serves to whoever has the URL (it cannot be blocked: gradio then
    refuses to process the upload itself). The URL is a capability: its folder is a digest keyed by a
    per-install random seed, so knowing (or guessing) the content does not give it."""
    import hashlib

    demo, url = app
    body = b"fresh secret 4417"
    r = httpx.post(f"{url}gradio_api/upload", files={"files": ("fresh.txt", body)})
    assert r.status_code == 200
    (path,) = r.json()
    folder = Path(path).parent.name
    assert Path(path).is_relative_to(os.environ["GRADIO_TEMP_DIR"]) and len(folder) == 64
    assert folder not in {hashlib.sha256(body).hexdigest(), hashlib.sha1(body).hexdigest()}
    guess = Path(path).parent.parent / hashlib.sha256(body).hexdigest() / "fresh.txt"
    assert refused(httpx.get(f"{url}gradio_api/file={guess}"))


def test_no_path_outside_is_served_or_ingested(app, tiny_model_dir):
    demo, url = app
    temp = os.environ["GRADIO_TEMP_DIR"]
    targets = ["/etc/passwd", f"{temp}/../../etc/passwd", f"{temp}/%2e%2e/%2e%2e/etc/passwd",
               "..%2F..%2F..%2F..%2Fetc%2Fpasswd", "../../../../etc/passwd", str(REPO / "launch.py"),
               str(tiny_model_dir / "config.json"), str(demo.longlens.settings.snapshot_dir), "file:///etc/passwd"]
    for t in targets:
        for route in ("gradio_api/file=", "gradio_api/file/", "file=", "static/../../../", "assets/../../"):
            r = httpx.get(f"{url}{route}{t}")
            assert r.status_code != 200 or (PASSWD not in r.text and "import" not in r.text[:200]), (route, t)
        assert refused(httpx.get(f"{url}gradio_api/file={t}")), t
    # nor through the API: a file value naming a server path is refused before any of it is read
    c = client(url)
    for t in ("/etc/passwd", f"{temp}/../../etc/passwd", str(REPO / "launch.py")):
        data = {"path": t, "orig_name": "passwd.txt", "meta": {"_type": "gradio.FileData"}}
        with pytest.raises(RuntimeError, match="error"):
            call_raw(url, "load_files", [[data]], c.session_hash)
    assert demo.longlens.registry.peek(c.session_hash).docs == []


def test_a_session_s_files_go_when_it_ends(app, tmp_path, monkeypatch):
    """Uploads and the session's own snapshot are removed when its client leaves (gradio's unload, fired when
    the client's heartbeat drops); a snapshot two sessions share goes with the last of them."""
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")  # read by gradio per heartbeat connection
    demo, url = app
    registry = demo.longlens.registry
    files = demo.longlens.files
    a, b = client(url), client(url)
    paths = write_files(tmp_path, {"shared.txt": lines("shared", 40)})
    assert "Corpus ready" in load(a, paths)[0] and len(ask(a)[0]) == 2
    wa = registry.peek(a.session_hash)
    snapshot = Path(wa.own_snapshots[0])
    assert snapshot.parent == files.corpora and snapshot.is_dir()
    assert files.uploads(a.session_hash).is_dir()
    assert "reused a snapshot" in load(b, paths)[0]  # the same files from B: the same snapshot, held twice
    a.close()
    # A's release is over once its uploads are gone: SessionFiles.drop removes them after the snapshots it frees
    assert wait_until(lambda: a.session_hash not in registry._table and not files.uploads(a.session_hash).exists(),
                      20), "A's session and uploads were not released"
    assert snapshot.is_dir()  # B still holds it
    b.close()
    assert wait_until(lambda: b.session_hash not in registry._table and not files.uploads(b.session_hash).exists(),
                      20), "B's session and uploads were not released"
    assert wait_until(lambda: not snapshot.exists(), 20), "the snapshot did not go with the last session holding it"


def test_a_restarted_server_shows_nobody_the_previous_users_corpora(tiny_model_dir, tmp_path):
    """The snapshots sessions prefill are theirs: not in the library the next server lists to everyone."""
    snaps = tmp_path / "snaps"
    demo, url = launch_app(tiny_model_dir, snaps)
    try:
        a = client(url)
        assert "Corpus ready" in load(a, write_files(tmp_path / "a", {"diary.txt": lines("diary")}))[0]
        ((label, path),) = a.predict(api_name="/list_snapshots")["choices"]
        assert "diary.txt" in label
    finally:
        demo.close()
    demo, url = launch_app(tiny_model_dir, snaps)  # the next server on the same folder
    try:
        b = client(url)
        assert b.predict(api_name="/list_snapshots")["choices"] == []
        assert "Pick a snapshot" in b.predict(path, api_name="/load_snapshot")[0]
        assert "Corpus ready" in b.predict(api_name="/load_sample")[0]  # the sample's snapshot is public
        (label, _), = b.predict(api_name="/list_snapshots")["choices"]
        assert "examples/" in label
    finally:
        demo.close()
    demo, url = launch_app(tiny_model_dir, snaps)
    try:  # a public corpus (the sample) is in the library for everyone from then on
        (label, _), = client(url).predict(api_name="/list_snapshots")["choices"]
        assert "examples/" in label and "diary" not in label
    finally:
        demo.close()


# ------------------------------------------------------------------------------------ limits
def test_limits_are_shown_and_enforced(tiny_model_dir, tmp_path):
    demo, url = launch_app(tiny_model_dir, tmp_path / "snaps", max_file_bytes=64 << 10, max_files=3, max_context=2048,
                           max_sessions=3)
    try:
        config = httpx.get(f"{url}config").json()
        shown = next(c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "ll-limits")
        for text in ("64.0 KiB per file", "3 files per upload", "2,048 tokens per session",
                     "512 of them kept for the chat", "3 sessions kept in memory"):
            assert text in shown, (text, shown)
        assert "64.0 KiB per file" in httpx.get(url).text  # in the page as served
        assert config.get("max_file_size") == 64 << 10  # the browser refuses bigger files before uploading
        c = client(url)
        four = write_files(tmp_path / "four", {f"f{i}.txt": lines(f"f{i}", 3) for i in range(4)})
        status = load(c, four)[0]
        assert "cannot be used" in status and "more than max_files=3" in status
        long = write_files(tmp_path / "long", {"long.txt": lines("long", 200)})
        status = load(c, long)[0]
        assert "does not fit the context" in status and "max_context_tokens is 2,048 tokens" in status
        assert "Corpus ready" in load(c, four[:3])[0]
        big = tmp_path / "big.txt"
        big.write_text("word " * (14 << 10))  # 70 KiB
        with big.open("rb") as f:
            assert httpx.post(f"{url}gradio_api/upload", files={"files": ("big.txt", f)}).status_code == 413
    finally:
        demo.close()
