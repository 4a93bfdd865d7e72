"""The running app, driven through gradio_client on loopback: upload, prefill, ask, sources;
per-user isolation; clear messages for oversize, binary and too-large inputs; one model queue;
LRU eviction of idle sessions to snapshots and transparent reload.

A random tiny model answers garbage, so these tests check plumbing and the provenance mapping
(chips and the source viewer show exactly the lines the capture points at); the needle test
with the trained model runs only when assets/model exists.
"""

import httpx
import pytest

from helpers import NEEDLE, QUESTION, SHIPPED, ask, client, launch_app, lines, load, text_of, wait_until, write_files


# ------------------------------------------------------------------------------------ the main path
@pytest.fixture(scope="module")
def alice(app, tmp_path_factory):
    """A client with two files loaded (progress streamed: the load job is returned) and one answer."""
    from gradio_client import handle_file

    demo, url = app
    c = client(url)
    paths = write_files(tmp_path_factory.mktemp("alice"), {"a.txt": lines("apple", 60),
                                                           "b.txt": lines("river", 60, needle_at=17)})
    job = c.submit([handle_file(str(p)) for p in paths], api_name="/load_files")
    job.result()
    answer = ask(c)
    return c, job, answer


def test_upload_prefill_ask_sources(app, alice):
    demo, _ = app
    c, job, (chat, chips, question) = alice
    progress = [o[0] for o in job.outputs() if o and isinstance(o[0], str) and "ll-bar" in o[0]]
    assert progress and "tokens/s" in progress[0] and "ETA" in progress[0]  # streamed while prefilling
    out = job.result()
    status, summary, docs, ledger, snaps = out[:5]
    assert "Corpus ready" in status and "2 document(s)" in status
    assert "a.txt" in docs and "b.txt" in docs and "/tmp" not in docs  # named as uploaded, not by temp path
    assert "2</b> documents" in summary
    assert ledger["type"] == "plotly" and "dense equivalent" in ledger["plot"]
    assert len(snaps["choices"]) == 1  # the prefill was saved as this session's snapshot
    assert [m["role"] for m in chat] == ["user", "assistant"] and text_of(chat[0]) == QUESTION
    assert question == ""  # the box is cleared for the next question
    # the chips are the provenance's sources, and the viewer opens exactly their lines
    ws = demo.longlens.registry.peek(c.session_hash)
    prov = ws.provenance
    assert prov is not None and prov.sources
    for i, src in enumerate(prov.sources[:3]):
        assert src.file in ("a.txt", "b.txt")
        assert f'data-ll-open="src:0:{i}"' in chips
        view = c.predict(f"src:0:{i}", api_name="/open_source")
        assert src.file in view and f"target {src.line_start}–{src.line_end}" in view
        first = src.snippet.split("\n")[0].rstrip("…")[:30]
        assert first.replace("'", "&#x27;") in view
    # the viewer maps a context position back to file and line: the needle's tokens -> b.txt:17
    d = ws.layout.documents[1]
    needle_pos = next(p for p in range(d.text_start, d.text_end) if ws.layout.lines[p] == 17) + ws.offset
    view = c.predict(f"pos:{needle_pos}", api_name="/open_source")
    assert "<b>b.txt</b>" in view and "target 17–17" in view and NEEDLE in view


def test_inspector_views(app, alice):
    demo, _ = app
    c = alice[0]
    heat, mass, hca, boundary = c.predict("all", "attention weight", api_name="/inspect")
    assert all(f["type"] == "plotly" for f in (heat, mass, hca, boundary))
    assert '"type":"heatmap"' in heat["plot"] and "b.txt" in heat["plot"]
    heat0, *_ = c.predict("0", "times picked", api_name="/inspect")  # one answer token
    assert "answer token #0" in heat0["plot"]
    ws = demo.longlens.registry.peek(c.session_hash)
    layer = next(iter(ws.provenance.csa))
    view = c.predict(f"cell:{layer}:0", api_name="/open_source")  # a heatmap cell -> the heaviest pick in it
    assert "picked by CSA layer" in view or "not document text" in view or "holds no selected block" in view


def test_two_clients_are_isolated(app, alice, tmp_path):
    demo, _ = app
    a = alice[0]
    b = client(app[1])
    out = load(b, write_files(tmp_path, {"c.md": lines("stone"), "d.py": "x = 1\n" * 30}))
    status, summary, docs, ledger, snaps = out[:5]
    assert "c.md" in docs and "a.txt" not in docs and "b.txt" not in docs
    assert all("a.txt" not in label for label, _ in snaps["choices"])  # not even the other's snapshot
    chat, chips, _ = ask(b)
    assert len(chat) == 2 and "a.txt" not in chips and "b.txt" not in chips
    assert "no document named" in b.predict("file:b.txt:17", api_name="/open_source")
    assert "c.md" in b.predict("src:0:0", api_name="/open_source") or "d.py" in b.predict("src:0:0",
                                                                                            api_name="/open_source")
    # and Alice still sees only her own corpus and her one answer
    assert "<b>b.txt</b>" in a.predict("file:b.txt:17", api_name="/open_source")
    assert "no document named" in a.predict("file:c.md:1", api_name="/open_source")
    wa, wb = (demo.longlens.registry.peek(x.session_hash) for x in (a, b))
    assert wa is not wb and len(wa.turns) == 1 and {d[0] for d in wa.docs} == {"a.txt", "b.txt"}


def test_snapshots_are_listed_and_reload(app, alice, tmp_path):
    a = alice[0]
    snaps = a.predict(api_name="/list_snapshots")
    (label, path), = snaps["choices"]
    assert "2 docs" in label and "a.txt" in label
    out = a.predict(path, api_name="/load_snapshot")
    assert "Corpus ready" in out[0] and "a.txt" in out[2] and out[5] == []  # the corpus back, a fresh chat
    # another user can neither list nor load it
    b = client(app[1])
    assert b.predict(api_name="/list_snapshots")["choices"] == []
    assert "Pick a snapshot" in b.predict(path, api_name="/load_snapshot")[0]
    # the same files from another user reuse the snapshot: no prefill
    paths = write_files(tmp_path, {"a.txt": lines("apple", 60), "b.txt": lines("river", 60, needle_at=17)})
    status = load(b, paths)[0]
    assert "reused a snapshot" in status


def test_missing_model_is_shown_not_raised(tmp_path):
    from app import Settings, build_demo

    demo, _ = build_demo(Settings(model_dir=tmp_path / "nothing", snapshot_dir=tmp_path / "s"))
    html = next(b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "ll-header")
    assert "No model loaded" in html and "config.json missing" in html


def test_bad_inputs_leave_the_session_usable(app, tmp_path):
    demo, url = app
    c = client(url)
    good = write_files(tmp_path / "good", {"notes.txt": lines("cloud", needle_at=3)})
    assert "Corpus ready" in load(c, good)[0]
    # oversize: refused at upload (client side and by the server), with the limit in the message
    big = tmp_path / "big.txt"
    big.write_text("word " * (20 << 10))  # 100 KiB > 64 KiB
    with pytest.raises(Exception, match="maximum file size"):
        load(c, [big])
    with big.open("rb") as f:
        r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.txt", f)})
    assert r.status_code == 413 and "maximum allowed size" in r.text.lower()
    # binary only: refused with the reason; binary next to text: skipped and named
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02\x03binary\x00" * 64)
    status = load(c, [binary])[0]
    assert "cannot be used" in status and "blob.bin: binary" in status and "previous corpus is still loaded" in status
    status = load(c, [binary, *good])[0]
    assert "Corpus ready" in status and "blob.bin: binary" in status
    # beyond the context (4096 - 1024 kept for the chat): refused before any prefill, nothing truncated
    huge = write_files(tmp_path / "huge", {"huge.txt": "".join(f"line {i} of many words here\n" for i in range(900))})
    status = load(c, huge)[0]
    assert "does not fit the context" in status and "at most" in status and "previous corpus is still loaded" in status
    # still usable: the previous corpus answers
    chat, chips, _ = ask(c)
    assert len(chat) == 2 and "notes.txt" in chips


def test_model_jobs_share_one_queue(app):
    demo, _ = app
    fns = {f.api_name: f for f in demo.fns.values()}
    for name in ("load_files", "load_folder", "load_sample", "load_snapshot", "ask", "retry", "clear"):
        assert (fns[name].concurrency_id, fns[name].concurrency_limit, fns[name].queue) == ("model", 1, True), name
    for name in ("stop", "cancel_prefill"):
        assert fns[name].queue is False, name  # acts at once, even while the model queue is full


def test_stop_retry_clear(app, tmp_path):
    demo, url = app
    c = client(url)
    load(c, write_files(tmp_path, {"e.txt": lines("ember")}))
    job = c.submit(QUESTION, 512, 0.0, -1, api_name="/ask")
    wait_until(job.outputs, timeout=60)  # the first streamed piece
    c.predict(api_name="/stop")
    chat, _, _ = job.result(timeout=60)
    assert "stopped" in text_of(chat[-1])
    chat, _, _ = c.predict(4, 0.0, -1, api_name="/retry")
    assert len(chat) == 2 and text_of(chat[0]) == QUESTION
    chat, _, _ = c.predict("A second question?", 4, 0.0, -1, api_name="/ask")
    assert len(chat) == 4
    ws = demo.longlens.registry.peek(c.session_hash)
    before = ws.session.n_tokens
    chat, _, _ = c.predict(4, 0.0, -1, api_name="/retry")  # only the last turn is redone; the first stays
    assert len(chat) == 4 and text_of(chat[0]) == QUESTION and text_of(chat[2]) == "A second question?"
    assert "earlier turn" not in text_of(chat[-1]) and ws.session.n_tokens == before
    chat, chips, _ = c.predict(api_name="/clear")
    assert chat == [] and chips == ""


def test_idle_sessions_are_spilled_and_reload(app, tmp_path):
    demo, url = app
    registry = demo.longlens.registry
    first = client(url)
    load(first, write_files(tmp_path / "f", {"first.txt": lines("first")}))
    ws = registry.peek(first.session_hash)
    others = []
    for i in range(2):  # max_sessions=2: two more resident sessions push the least recently used one out
        o = client(url)
        load(o, write_files(tmp_path / f"o{i}", {f"other{i}.txt": lines(f"other{i}")}))
        others.append(o)
    assert len(registry.resident_keys()) <= 2
    assert not ws.resident and ws.spilled is not None and ws.spilled.is_dir()
    assert "first.txt" in first.predict("file:first.txt:2", api_name="/open_source")  # views work while spilled
    chat, chips, _ = ask(first)  # a model job reloads it transparently
    assert ws.resident and ws.spilled is None and len(chat) == 2 and "first.txt" in chips
    assert len(registry.resident_keys()) <= 2
    # the browser leaving releases the session and its spill folder
    spilled = [registry.peek(o.session_hash) for o in others]
    key = next(o.session_hash for o, w in zip(others, spilled) if not w.resident)
    folder = registry.spill_folder(key)
    assert folder.is_dir()
    registry.release(key)
    assert not folder.exists() and key not in registry.resident_keys()


def test_registry_lru_never_evicts_busy(tmp_path):
    from app.sessions import Busy, Registry

    class Fake:
        def __init__(self, key):
            self.key, self.resident, self.busy, self.last_used, self.spills = key, False, "", 0.0, 0

        def spill(self, folder):
            folder.mkdir(parents=True, exist_ok=True)
            self.resident, self.spills = False, self.spills + 1

        def unspill(self):
            self.resident = True

        def close(self):
            self.resident = False

    reg = Registry(Fake, max_resident=2, spill_dir=tmp_path)
    with reg.use("a", "job"):
        with reg.use("b", "job"):
            with pytest.raises(Busy):
                with reg.use("a", "other"):
                    pass
            with reg.use("c", "job"):  # a and b are busy: nothing can go while c runs
                assert sorted(reg.resident_keys()) == ["a", "b", "c"]
            assert sorted(reg.resident_keys()) == ["a", "b"]  # c, the only idle one, went when it ended
    with reg.use("c", "job"):  # back: reloaded; the least recently used idle one (b) goes
        assert sorted(reg.resident_keys()) == ["a", "c"] and reg.peek("b").spills == 1
    assert reg.spill_folder("b").is_dir()
    reg.release("b")
    assert len(reg) == 2 and not reg.spill_folder("b").exists()


def test_build_corpus_names(tmp_path):
    import zipfile

    from app.workspace import InputError, build_corpus

    up = tmp_path / "upload1"
    up.mkdir()
    (up / "notes.md").write_text("hello\n")
    with zipfile.ZipFile(up / "pack.zip", "w") as z:
        z.writestr("inner/x.py", "print(1)\n")
    other = tmp_path / "upload2"
    other.mkdir()
    (other / "notes.md").write_text("again\n")
    corpus = build_corpus([(up / "notes.md", "notes.md"), (up / "pack.zip", "pack.zip"),
                           (other / "notes.md", "notes.md")], 1 << 20, 100)
    assert [d.name for d in corpus.documents] == ["notes.md", "pack.zip/inner/x.py", "notes.md (2)"]
    with pytest.raises(InputError, match="no files"):
        build_corpus([], 1 << 20, 100)


# ------------------------------------------------------------------------------------ error codes -> the page's words
def test_errors_are_explained_by_their_code():
    """app/errors.py: the status title and the hint come from `code` and `remedy`, not from class names or text."""
    from app.errors import CLEAR_CHAT_HINT, InputError, code_of, explain
    from app.sessions import Busy
    from runtime import Cancelled, ContextTooLarge, CorpusError, EngineError, SnapshotError

    full = ContextTooLarge("the conversation is full: 3,000 tokens used; start a new conversation", 3100, 3072,
                           code="conversation_full", remedy="new_conversation")
    e = explain(full)
    assert (e.title, e.kind, e.hint) == ("The conversation is full", "warn", CLEAR_CHAT_HINT)
    assert e.text() == f"{full} {CLEAR_CHAT_HINT}" and "Clear chat" in e.text()
    broken = EngineError("this session is unusable after an error (out of memory)", code="broken",
                         remedy="new_conversation")
    assert explain(broken).hint == CLEAR_CHAT_HINT and explain(broken).kind == "error"
    streaming = EngineError("an answer is still streaming", code="busy", remedy="stop")
    assert explain(streaming).title == "Busy" and "Stop" in explain(streaming).hint
    cases = {ContextTooLarge("12,000 tokens; at most 3,072 fit", 12000, 3072): "The corpus does not fit the context",
             Cancelled("prefill stopped after 2,048 of 9,000 tokens"): "Prefill stopped",
             CorpusError("blob.bin: binary"): "These files cannot be used",
             InputError("no files given"): "These files cannot be used",
             SnapshotError("damaged snapshot"): "This snapshot cannot be used",
             Busy("Your session is still busy (answering)"): "Busy"}
    for err, title in cases.items():
        assert explain(err, fallback="Loading failed").title == title, err
        assert explain(err).hint == "" and explain(err).message == str(err)
    # a subclass does not decide the title; its code does
    assert explain(ContextTooLarge("x", 1, 0, code="conversation_full")).title == "The conversation is full"
    # errors no request should cause have no code: the caller's fallback
    oom = RuntimeError("out of memory")
    assert code_of(oom) is None and explain(oom, fallback="Loading failed").title == "Loading failed"
    assert code_of(OSError("disk full")) is None and code_of(EngineError("bad")) == "bad_request"


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no trained model in assets/model yet")
def test_trained_model_finds_the_planted_fact(tmp_path):
    """The shipped model, end to end: the sample corpus, its question, the answer and the right file; then two
    uploaded files (the fact in one of them) and the same question. (Telling two planted facts apart by their
    key is beyond this checkpoint: assets/model/MODEL_CARD.md.)"""
    demo, url = launch_app(SHIPPED, tmp_path / "snapshots")
    try:
        c = client(url)
        status = c.predict(api_name="/load_sample")[0]
        assert "Corpus ready" in status
        chat, chips, _ = c.predict("What is the access code for the misty lighthouse?", 16, 0.0, -1, api_name="/ask")
        ws = demo.longlens.registry.peek(c.session_hash)
        assert text_of(chat[-1]).split("\n")[0].strip() == "5820417" and ws.provenance.sources
        assert ws.provenance.sources[0].file == "examples/lighthouse_log.md"
        assert "examples/lighthouse_log.md" in chips

        d = client(url)
        examples = SHIPPED.parent / "examples"
        assert "Corpus ready" in load(d, [examples / "lighthouse_log.md", examples / "tides.csv"])[0]
        chat, chips, _ = d.predict("What is the access code for the misty lighthouse?", 16, 0.0, -1, api_name="/ask")
        wd = demo.longlens.registry.peek(d.session_hash)
        assert text_of(chat[-1]).split("\n")[0].strip() == "5820417"
        assert wd.provenance.sources[0].file == "lighthouse_log.md" and "lighthouse_log.md" in chips
    finally:
        demo.close()
