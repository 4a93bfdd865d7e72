"""Faults (issue 7, items 1 and 5): hostile uploads and broken checkpoints get an error naming the file and
the reason while the session's corpus and chat stay; a generation that fails (out of memory) errs for its
user only; the server killed (SIGKILL) during a prefill or during a snapshot write restarts clean: nothing
broken is listed or loaded, and the user loads the corpus again.

The app runs in this process where a test needs to reach inside it (a failing forward for one session) and
as a real `python launch.py` process where it is killed.
"""

import os
import tarfile
from pathlib import Path

import httpx
import pytest

from helpers import (HELLO_PDF, QUESTION, ask, call_raw, client, encrypt_pdf, launch_app, lines, load, make_pdf,
                     tar_bytes, text_of, wait_until, write_files, zip_bytes)
from live_server import Server, long_context_model

APP_SETTINGS = {"max_sessions": 4}  # conftest's `app`


def words_line(n_words: int, seed: int = 0) -> str:
    import random

    rnd = random.Random(seed)
    vocab = ["harbor", "signal", "lantern", "granite", "meadow", "copper", "violet", "tundra", "orbit", "quartz"]
    return " ".join(rnd.choice(vocab) + str(rnd.randrange(1000)) for _ in range(n_words))


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, a fragment of the reason the app must give)."""
    sym_tar = tar_bytes([("link.txt", tarfile.SYMTYPE, "/etc/passwd"), ("hard.txt", tarfile.LNKTYPE, "/etc/shadow")])
    return {
        "empty.txt": (b"", "empty"),
        "blank.md": (b"  \n\t\n", "whitespace"),
        "nul.txt": (b"text\x00with a NUL", "NUL"),
        "image.png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, "binary"),
        "bomb.zip": (zip_bytes({"zeros.txt": b"0" * (8 << 20)}), "bomb.zip/zeros.txt: larger than max_file_bytes"),
        "escape.zip": (zip_bytes({"../../etc/cron.d/x": b"x", "/etc/passwd": b"x"}), "unsafe path"),
        "links.tar.gz": (sym_tar, "links.tar.gz/link.txt: symlink in archive"),
        "deep.zip": (zip_bytes({"a.zip": zip_bytes({"b.zip": zip_bytes({"c.txt": b"deep"})})}),
                     "max_archive_depth"),
        "broken.zip": (b"PK\x03\x04 this is no zip at all", "broken.zip: malformed zip archive"),
        "locked.pdf": (encrypt_pdf(HELLO_PDF, "secret"), "locked.pdf: encrypted PDF"),
        "scan.pdf": (make_pdf(None), "scan.pdf: PDF has no text layer"),
    }


# ------------------------------------------------------------------------------------ item 1: inputs
def test_bad_inputs_keep_the_corpus_and_the_chat(app, tmp_path):
    """Through gradio_client: a corpus and one answer, then every kind of hostile upload, each refused with
    the file and the reason; the corpus and the chat are untouched and the next question is answered."""
    demo, url = app
    c = client(url)
    good = write_files(tmp_path / "good", {"notes.txt": lines("cloud", needle_at=3)})
    assert "Corpus ready" in load(c, good)[0]
    chat, chips, _ = ask(c)
    assert len(chat) == 2 and "notes.txt" in chips
    ws = demo.longlens.registry.peek(c.session_hash)
    private = str(ws.files.root)
    for name, (data, reason) in bad_inputs().items():
        path = tmp_path / "bad" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        out = load(c, [path])
        status = out[0]
        assert "These files cannot be used" in status, (name, status)
        assert reason in status, (name, status)
        assert "previous corpus is still loaded" in status, (name, status)
        # named as the user knows the file, never by a server path
        assert private not in status and os.environ["GRADIO_TEMP_DIR"] not in status and str(tmp_path) not in status
        assert "notes.txt" in out[2]  # the documents view still shows the loaded corpus
    # one line of ~60 KB (under the 64 KB upload limit) that does not fit the context: refused before any prefill
    one_line = tmp_path / "bad" / "one_line.txt"
    one_line.write_text(words_line(9000)[:60000].rsplit(" ", 1)[0])
    status = load(c, [one_line])[0]
    assert "does not fit the context" in status and "one_line.txt" in status and "previous corpus" in status
    # still the same corpus, and the chat goes on from the first answer
    assert [d[0] for d in ws.docs] == ["notes.txt"] and len(ws.turns) == 1
    chat, chips, _ = ask(c)
    assert len(chat) == 4 and text_of(chat[0]) == QUESTION and "notes.txt" in chips


def test_a_file_that_vanished_is_named(app, tmp_path):
    """An upload gone from the server before its job ran (cleaned up, or removed mid-read): the error names it."""
    demo, url = app
    c = client(url)
    assert "Corpus ready" in load(c, write_files(tmp_path, {"kept.txt": lines("kept")}))[0]
    src = write_files(tmp_path / "up", {"gone.txt": lines("gone")})[0]
    with src.open("rb") as f:
        (server_path,) = httpx.post(f"{url}gradio_api/upload", files={"files": ("gone.txt", f)}).json()
    os.remove(server_path)
    # gradio_client would upload a local path again: send the server's path as the browser does (FileData)
    data = {"path": server_path, "orig_name": "gone.txt", "meta": {"_type": "gradio.FileData"}}
    status = call_raw(url, "load_files", [[data]], c.session_hash)[0]
    assert "cannot be used" in status and "gone.txt: no such file" in status and server_path not in status
    assert "previous corpus is still loaded" in status
    chat, chips, _ = ask(c)
    assert len(chat) == 2 and "kept.txt" in chips


def _broken_models(tiny: Path, root: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (model folder, fragments the error must hold)."""
    import json
    import shutil

    cfg = json.loads((tiny / "config.json").read_text())
    weights = (tiny / "model.safetensors").read_bytes()

    def make(name, config=cfg, data=weights):
        d = root / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config))
        shutil.copy(tiny / "tokenizer.json", d / "tokenizer.json")
        if data is not None:
            (d / "model.safetensors").write_bytes(data)
        return d

    no_factor = json.loads(json.dumps(cfg))
    del no_factor["rope_parameters"]["compress"]["factor"]
    return {
        "config but no weights": (make("noweights", data=None), ["noweights", "no *.safetensors files"]),
        "random bytes as model.safetensors": (make("random", data=os.urandom(4096)),
                                              ["model.safetensors: not a readable safetensors file"]),
        "truncated safetensors": (make("truncated", data=weights[: len(weights) // 2]),
                                  ["model.safetensors"]),
        "contradictory keys": (make("contradict", {**cfg, "qk_rope_head_dim": 4}),
                               ["contradict/config.json", "qk_rope_head_dim / partial_rotary_factor: contradictory"]),
        "layer schedule twice, disagreeing": (make("schedule", {**cfg, "compress_ratios": [0, 4, 0, 4, 0]}),
                                              ["schedule/config.json", "layer_types / compress_ratios: contradictory"]),
        "unknown model_type": (make("llama", {**cfg, "model_type": "llama"}), ["llama/config.json", "model_type"]),
        "a missing nested key": (make("nofactor", no_factor), ["nofactor/config.json", "factor: missing"]),
        "a wrong type": (make("wrongtype", {**cfg, "num_hidden_layers": "4"}),
                         ["wrongtype/config.json", "num_hidden_layers: expected a positive integer"]),
        "weights of another shape": (make("shape", {**cfg, "moe_intermediate_size": 48}),
                                     ["expected shape", "in model.safetensors"]),
    }


def test_broken_checkpoints_are_named_and_the_page_stays_up(tiny_model_dir, tmp_path):
    from app import Settings, build_demo
    from runtime import Engine

    cases = _broken_models(tiny_model_dir, tmp_path / "models")
    for case, (folder, fragments) in cases.items():
        with pytest.raises(ValueError) as e:  # EngineError, CheckpointError, ConfigError: all ValueErrors
            Engine.from_dir(folder)
        assert all(f in str(e.value) for f in fragments), (case, str(e.value))
        demo, _ = build_demo(Settings(model_dir=folder, snapshot_dir=tmp_path / "s"))  # no exception: a page
        header = next(b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "ll-header")
        assert "No model loaded" in header and all(f in header for f in fragments), (case, header)
    # served, the page answers every job with the reason instead of failing
    folder, fragments = cases["random bytes as model.safetensors"]
    demo, url = launch_app(folder, tmp_path / "served")
    try:
        c = client(url)
        status = c.predict(api_name="/load_sample")[0]
        assert "No model is loaded" in status and "not a readable safetensors file" in status
    finally:
        demo.close()


# ------------------------------------------------------------------------------------ item 5: a failing model
def test_a_failing_generation_errs_for_its_user_only(app, tmp_path, monkeypatch):
    """The model's forward raises 'out of memory' for one session only: that user gets the message (while
    answering, then while prefilling), the other keeps being served, and the first recovers."""
    from gradio_client.exceptions import AppError

    demo, url = app
    registry, model = demo.longlens.registry, demo.longlens.engine.model
    a, b = client(url), client(url)
    assert "Corpus ready" in load(a, write_files(tmp_path / "a", {"alpha.txt": lines("alpha")}))[0]
    assert "Corpus ready" in load(b, write_files(tmp_path / "b", {"beta.txt": lines("beta")}))[0]
    victim = registry.peek(a.session_hash)
    real = model.forward
    failures = []

    def forward(ids, cache, *args, **kw):
        if victim.session is not None and cache is victim.session.cache:
            failures.append(ids.shape[-1])
            raise RuntimeError("out of memory")
        return real(ids, cache, *args, **kw)

    monkeypatch.setattr(model, "forward", forward)
    job_a = a.submit(QUESTION, 6, 0.0, -1, api_name="/ask")
    job_b = b.submit(QUESTION, 6, 0.0, -1, api_name="/ask")
    with pytest.raises(AppError, match="out of memory.*Clear chat"):
        job_a.result(timeout=60)
    chat, chips, _ = job_b.result(timeout=60)
    assert failures and len(chat) == 2 and "beta.txt" in chips and "alpha.txt" not in chips
    # the same while prefilling a new corpus: a clear status, and no half-loaded corpus shown as loaded
    out = load(a, write_files(tmp_path / "a2", {"gamma.txt": lines("gamma", 200)}))
    assert "Loading failed" in out[0] and "out of memory" in out[0] and "No corpus is loaded" in out[0]
    assert out[2] == "" and victim.docs == [] and victim.session.n_tokens == 0
    chat, chips, _ = ask(b)  # still serving the other user, whose chat goes on
    assert len(chat) == 4 and "beta.txt" in chips
    monkeypatch.setattr(model, "forward", real)
    assert "Corpus ready" in load(a, write_files(tmp_path / "a3", {"alpha.txt": lines("alpha")}))[0]
    chat, chips, _ = ask(a)
    assert len(chat) == 2 and "alpha.txt" in chips


def test_a_failed_answer_is_cleared_and_the_corpus_kept(app, tmp_path, monkeypatch):
    """After an answer failed midway, Clear chat rewinds to the corpus: no prefill, the next answer works."""
    from gradio_client.exceptions import AppError

    demo, url = app
    c = client(url)
    assert "Corpus ready" in load(c, write_files(tmp_path, {"delta.txt": lines("delta")}))[0]
    ws = demo.longlens.registry.peek(c.session_hash)
    model, real, calls = demo.longlens.engine.model, demo.longlens.engine.model.forward, []

    def forward(ids, cache, *args, **kw):
        calls.append(1)
        if len(calls) == 3 and cache is ws.session.cache:  # the question is read; the answer fails mid-decode
            raise RuntimeError("out of memory")
        return real(ids, cache, *args, **kw)

    monkeypatch.setattr(model, "forward", forward)
    job = c.submit(QUESTION, 8, 0.0, -1, api_name="/ask")
    with pytest.raises(AppError, match="out of memory"):
        job.result(timeout=60)
    chat = job.outputs()[-1][0]  # the failed turn says so in the chat too
    assert "out of memory" in text_of(chat[-1]) and "press Clear chat" in text_of(chat[-1])
    chat, _, _ = ask(c)  # asking again is refused with what to do, rather than answering from a broken cache
    note = text_of(chat[-1])  # the runtime's reason, and the page's remedy for it (app/errors.py: remedy new_conversation)
    assert "unusable after an error" in note and "Press Clear chat to start a new conversation" in note
    monkeypatch.setattr(model, "forward", real)
    corpus_tokens = ws.session.corpus_tokens
    chat, chips, _ = c.predict(api_name="/clear")
    assert chat == [] and ws.session.n_tokens == corpus_tokens  # rewound, not prefilled again
    chat, chips, _ = ask(c)
    assert len(chat) == 2 and "delta.txt" in chips


# ------------------------------------------------------------------------------------ item 5: killed server
def big_corpus(folder: Path, word: str, n_lines: int = 450) -> list[Path]:
    """About 20,000 tokens: seconds of prefill for the tiny model on one thread."""
    return write_files(folder, {f"{word}.txt": "".join(f"{word} line {i}: {words_line(8, i)}\n"
                                                       for i in range(n_lines))})


@pytest.fixture(scope="module")
def long_model(tiny_model_dir, tmp_path_factory):
    return long_context_model(tiny_model_dir, tmp_path_factory.getbasetemp() / "longlens-tiny-32k")


def _restart_and_reload(long_model, snaps, killed: Server, corpus, tmp_path):
    """Restart on the same snapshot folder: the dead process's files are gone, nothing broken is listed,
    whatever is listed loads whole, and the user's corpus loads again (prefilled) and answers."""
    from gradio_client import Client

    with Server(long_model, snaps, temp_dir=tmp_path / "gradio2") as s2:
        assert not killed.private_dir.exists()  # swept at start: partial writes, uploads, session snapshots
        c = Client(s2.url, verbose=False)
        listed = c.predict(api_name="/list_snapshots")["choices"]
        for _, path in listed:  # only complete snapshots are listed, and each loads whole
            assert "Corpus ready" in c.predict(path, api_name="/load_snapshot")[0]
        status = load(c, corpus)[0]
        assert "Corpus ready" in status and "prefilled in" in status, status
        chat, chips, _ = ask(c)
        assert len(chat) == 2 and corpus[0].name in chips
        c.close()
        return listed


@pytest.mark.slow
def test_kill_during_prefill_then_restart(long_model, tmp_path):
    from gradio_client import Client, handle_file

    snaps = tmp_path / "snaps"
    corpus = big_corpus(tmp_path / "corpus", "orchard")
    s1 = Server(long_model, snaps, temp_dir=tmp_path / "gradio1")
    try:
        c = Client(s1.url, verbose=False)
        job = c.submit([handle_file(str(p)) for p in corpus], api_name="/load_files")
        seen = None

        def progress_streamed() -> bool:  # (or the job over: then nothing was seen mid-prefill)
            nonlocal seen
            if job.done():
                return True
            seen = next((o[0] for o in job.outputs() if o and "ll-bar" in str(o[0])), None)
            return seen is not None

        wait_until(progress_streamed, timeout=120, interval=0.02)
        assert seen is not None, "no prefill progress was streamed"
        s1.kill()  # mid-prefill: the first chunk reported, more to come
        assert "Prefilling" in seen and "/ " in seen
    finally:
        s1.kill()
    c.close()
    from runtime import list_snapshots

    assert list_snapshots(snaps) == [] and list_snapshots(s1.private_dir / "corpora") == []  # nothing complete
    _restart_and_reload(long_model, snaps, s1, corpus, tmp_path)


@pytest.mark.slow
def test_kill_during_snapshot_write_then_restart(long_model, tmp_path):
    """SIGKILL while the prefilled corpus is being written as a snapshot (its cache file is in the temp folder)."""
    from gradio_client import Client, handle_file

    from runtime import list_snapshots

    snaps = tmp_path / "snaps"
    s1 = Server(long_model, snaps, temp_dir=tmp_path / "gradio1")
    partial = None
    try:
        c = Client(s1.url, verbose=False)
        corpora = s1.private_dir / "corpora"

        def mid_write(job) -> bool:  # a snapshot folder with its cache written and the rest to come (or the job over)
            nonlocal partial
            if job.done():
                return True
            try:
                tmp = [p for p in corpora.iterdir() if p.name.startswith(".tmp-")
                       and (p / "cache.safetensors").exists()]
            except FileNotFoundError:
                tmp = []
            partial = tmp[0] if tmp else None
            return partial is not None

        for attempt in range(3):  # a write is short: try again with another corpus if the kill came too late
            corpus = big_corpus(tmp_path / f"corpus{attempt}", f"orchard{attempt}")
            job = c.submit([handle_file(str(p)) for p in corpus], api_name="/load_files")
            wait_until(lambda job=job: mid_write(job), timeout=120, interval=0.0005)  # every 0.5 ms: into the write
            if partial is not None:
                s1.kill()
                break
            job.result(timeout=60)
    finally:
        s1.kill()
    c.close()
    assert partial is not None and partial.is_dir(), "no kill landed inside a snapshot write"
    whole = (partial / "manifest.json").exists()  # written last: only then could the folder be used
    # pretend the interrupted write had been one into the shared library, under a final-looking name too
    import shutil

    shutil.copytree(partial, snaps / partial.name)
    shutil.copytree(partial, snaps / "interrupted")
    complete = {str(s.path) for s in list_snapshots(snaps) if s.complete}
    listed = _restart_and_reload(long_model, snaps, s1, corpus, tmp_path)
    assert {p for _, p in listed} == complete  # only a complete (whole) one could ever be listed
    assert whole or str(snaps / "interrupted") not in {p for _, p in listed}
