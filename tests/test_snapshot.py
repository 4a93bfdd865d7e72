"""Snapshots: exact round trip (same next logits, same answers), reuse by corpus key, refusal of another
model / corpus / damaged files, and SIGKILL while saving never leaves something that loads."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import drain, wait_until, write_corpus

from runtime.engine import ContextTooLarge, Engine, GenerationParams
from runtime.snapshot import SnapshotError, list_snapshots, load_snapshot

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_dir(tiny_model_dir, chunk_size=256)


@pytest.fixture(scope="module")
def saved(engine, corpus_paths, tmp_path_factory):
    """(snapshot dir, the prefilled session that wrote it, its load report)."""
    d = tmp_path_factory.mktemp("snaps")
    session = engine.new_session()
    report = session.load_corpus(corpus_paths, snapshot_dir=d)
    return d, session, report


def probe(engine, session):
    """Next logits after three extra tokens, on a copy of the session's state (it is reloaded after)."""
    return engine.forward([11, 12, 13], session.cache)


def test_round_trip_is_exact(engine, corpus_paths, saved, tmp_path):
    d, first, report = saved
    assert report.source == "prefill" and report.snapshot.parent == d and not report.warnings
    second = engine.new_session()
    again = second.load_corpus(corpus_paths, snapshot_dir=d)
    assert again.source == "snapshot" and again.snapshot == report.snapshot
    assert again.timings["prefill_tokens"] == 0  # nothing was prefilled (speed lives in bench/snapshot_bench.py)
    assert torch.equal(second.last_logits, first.last_logits)
    assert list(second.layout.ids) == list(first.layout.ids) and second.cache.nbytes() == first.cache.nbytes()
    params = GenerationParams(max_new_tokens=3)
    a1, a2 = drain(first.ask("Where is the code?", params))[1], drain(second.ask("Where is the code?", params))[1]
    assert a1.token_ids == a2.token_ids and [s.to_dict() for s in a1.provenance.sources] == \
        [s.to_dict() for s in a2.provenance.sources]
    assert torch.equal(probe(engine, first), probe(engine, second))
    first.reset_chat()  # probe() extended the caches outside the session's books: rewind
    second.reset_chat()


def test_mid_conversation_snapshot(engine, saved, tmp_path):
    _, session, _ = saved
    session.reset_chat()
    drain(session.ask("First question?", GenerationParams(max_new_tokens=3)))
    path = session.save_snapshot(tmp_path)
    restored = engine.new_session()
    restored.load_snapshot(path)
    assert restored.chat_ids == session.chat_ids and restored.pending == session.pending
    assert [vars(t) for t in restored.history] == [vars(t) for t in session.history]
    params = GenerationParams(max_new_tokens=3)
    b1, b2 = drain(session.ask("Second?", params))[1], drain(restored.ask("Second?", params))[1]
    assert b1.token_ids == b2.token_ids and b1.timings["prefill_tokens"] == b2.timings["prefill_tokens"]
    assert torch.equal(session.last_logits, restored.last_logits)
    session.reset_chat()
    restored.reset_chat()  # the corpus-end mark travelled with the snapshot
    assert restored.n_tokens == restored.corpus_tokens == session.n_tokens
    assert torch.equal(restored.last_logits, session.last_logits)
    assert torch.equal(probe(engine, session), probe(engine, restored))
    session.reset_chat()


def test_other_model_refused(tiny_model_dir, corpus_paths, saved):
    d, _, report = saved
    bf16 = Engine.from_dir(tiny_model_dir, dtype=torch.bfloat16, chunk_size=512)  # same files, other dtype: other model
    with pytest.raises(SnapshotError, match="different model"):
        bf16.new_session().load_snapshot(report.snapshot)
    relabelled = Engine(bf16.model, bf16.tokenizer, model_fingerprint="f" * 64)
    with pytest.raises(SnapshotError, match="different model"):
        relabelled.new_session().load_snapshot(report.snapshot)


def test_snapshot_beyond_the_engine_limits_refused(engine, saved):
    small = Engine(engine.model, engine.tokenizer, max_context_tokens=300)
    with pytest.raises(ContextTooLarge, match="at most 225 fit"):
        small.new_session().load_snapshot(saved[2].snapshot)


def test_other_corpus_refused(engine, saved, tmp_path):
    d, session, report = saved
    other = write_corpus(tmp_path / "other", needle_at=("a.txt", 3))
    fresh = engine.new_session()
    key = fresh.load_corpus(other).snapshot  # no snapshot dir: nothing saved
    assert key is None
    fresh_key = fresh.fingerprints().key
    shutil.copytree(report.snapshot, d / fresh_key)  # a snapshot of corpus 1 filed under corpus 2's key
    s = engine.new_session()
    r = s.load_corpus(other, snapshot_dir=d)
    assert r.source == "prefill" and any("different corpus" in w for w in r.warnings)
    assert torch.equal(s.last_logits, fresh.last_logits)
    assert engine.new_session().load_corpus(other, snapshot_dir=d).source == "snapshot"  # replaced by a good one
    with pytest.raises(SnapshotError, match="different corpus"):
        load_snapshot(report.snapshot, engine.config, {"corpus": fresh.fingerprints().corpus})


def _flip_byte(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


DAMAGE = {
    "tensor byte flipped": (lambda s: _flip_byte(s / "cache.safetensors"), "damaged snapshot"),
    "layout truncated": (lambda s: (s / "layout.json").write_bytes((s / "layout.json").read_bytes()[:100]),
                         "damaged snapshot"),
    "chat missing": (lambda s: (s / "chat.json").unlink(), r"chat\.json is missing"),
    "no manifest": (lambda s: (s / "manifest.json").unlink(), "incomplete snapshot"),
    "garbage manifest": (lambda s: (s / "manifest.json").write_text("{not json"), "manifest.json unreadable"),
    "foreign format": (lambda s: (s / "manifest.json").write_text(json.dumps({"format": "x"})), "not a longlens"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_snapshot_refused(engine, saved, tmp_path, damage):
    _, _, report = saved
    copy = tmp_path / report.snapshot.name
    shutil.copytree(report.snapshot, copy)
    harm, message = DAMAGE[damage]
    harm(copy)
    with pytest.raises(SnapshotError, match=message):
        engine.new_session().load_snapshot(copy)


def test_damaged_snapshot_is_replaced_on_reuse(engine, corpus_paths, saved, tmp_path):
    _, session, report = saved
    shutil.copytree(report.snapshot, tmp_path / report.snapshot.name)
    _flip_byte(tmp_path / report.snapshot.name / "cache.safetensors")
    s = engine.new_session()
    r = s.load_corpus(corpus_paths, snapshot_dir=tmp_path)
    assert r.source == "prefill" and "sha256" in r.warnings[0] and r.snapshot == tmp_path / report.snapshot.name
    assert engine.new_session().load_corpus(corpus_paths, snapshot_dir=tmp_path).source == "snapshot"


def test_list_snapshots(saved, tmp_path):
    _, _, report = saved
    shutil.copytree(report.snapshot, tmp_path / report.snapshot.name)
    (tmp_path / "broken").mkdir()
    (tmp_path / ".tmp-abc-1-x").mkdir()  # an interrupted save: never listed
    snaps = {s.key: s for s in list_snapshots(tmp_path)}
    assert set(snaps) == {report.snapshot.name, "broken"}
    good = snaps[report.snapshot.name]
    assert good.complete and good.tokens == report.tokens and good.documents == 3 and good.bytes > 0
    assert good.names[0].endswith("a.txt") and good.chat_tokens == 0
    assert not snaps["broken"].complete and "incomplete" in snaps["broken"].problem
    assert list_snapshots(tmp_path / "missing") == []


HELPER = """
import sys
from runtime.engine import Engine
session = Engine.from_dir(sys.argv[1], chunk_size=256).new_session()
session.load_corpus(sys.argv[3:])
print("ready", flush=True)
n = 0
while True:  # rewrite the snapshot over and over: a kill lands somewhere inside a save
    session.save_snapshot(sys.argv[2], overwrite=True)
    n += 1
    print(n, flush=True)
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_sigkill_while_saving_never_loads_broken(tiny_model_dir, engine, corpus_paths, saved, tmp_path):
    _, reference, _ = saved
    reference.reset_chat()
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    leftovers = []
    # kill at several delays after the third save; stop once a kill has landed inside a save (on a loaded
    # machine the first delays can all fall between two saves)
    for round_, delay in enumerate((0.0, 0.013, 0.004, 0.03, 0.008, 0.06, 0.002, 0.1)):
        if round_ >= 2 and leftovers:
            break
        d = tmp_path / f"snaps{round_}"
        proc = subprocess.Popen([sys.executable, str(helper), str(tiny_model_dir), str(d), *map(str, corpus_paths)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO, env=_env())
        try:
            while (line := proc.stdout.readline().strip()) != "3":  # a few complete saves, then kill mid-loop
                assert line, "helper exited early"
            time.sleep(delay)  # elapsed time is the point: each delay puts the kill elsewhere in the next saves
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        leftovers += [p.name for p in d.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
        s = engine.new_session()
        r = s.load_corpus(corpus_paths, snapshot_dir=d)
        # whatever loads is whole (another process: equal up to float reassociation, not bit for bit)
        torch.testing.assert_close(s.last_logits, reference.last_logits, atol=1e-4, rtol=1e-4)
        if r.source == "snapshot":
            torch.testing.assert_close(probe(engine, s), probe(engine, reference), atol=1e-4, rtol=1e-4)
            reference.reset_chat()
        assert [x.key for x in list_snapshots(d)] == [reference.fingerprints().key]
    assert leftovers, "no kill landed inside a save (the loop should be writing nearly all the time)"


def test_sigkill_of_the_cli_save(tiny_model_dir, engine, corpus_paths, saved, tmp_path):
    """`python -m runtime snapshot save` killed once files appear in its temp folder: nothing but a whole snapshot loads."""
    d = tmp_path / "snaps"
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "snapshot", "save", "--corpus", *map(str, corpus_paths),
                             "--model", str(tiny_model_dir), "--snapshot-dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=_env())

    def writing():
        try:
            return d.is_dir() and any(p.name.startswith(".tmp-") and any(p.iterdir()) for p in d.iterdir())
        except FileNotFoundError:  # renamed while we looked
            return True

    try:  # poll every 0.5 ms: a save is short, the kill must land inside it
        wait_until(lambda: proc.poll() is not None or writing(), timeout=120, interval=0.0005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    key = saved[1].fingerprints().key
    if (d / key).exists():  # the rename happened before the kill: it must be whole
        engine.new_session().load_snapshot(d / key)
    else:
        with pytest.raises(SnapshotError, match="no such snapshot"):
            engine.new_session().load_snapshot(d / key)
        assert engine.new_session().load_corpus(corpus_paths, snapshot_dir=d).source == "prefill"
        assert not any(p.name.startswith(".tmp-") for p in d.iterdir())  # the next save cleaned up
