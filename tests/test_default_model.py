"""The shipped default model (assets/model): it loads with the runtime, finds a planted needle in a
~2k-token held-out haystack end to end (chunked prefill, greedy decode), and evaluate() returns
well-formed cells."""

import json
import random
import sys
from pathlib import Path

import pytest

import runtime
from runtime import evaluate as ev, tasks as T

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "assets" / "model"


@pytest.fixture(scope="module")
def model(shipped_model):  # loaded once per run (conftest.py)
    return shipped_model


@pytest.fixture(scope="module")
def tok(shipped_tokenizer):
    return shipped_tokenizer


@pytest.fixture(scope="module")
def pool(tok):
    """Held-out haystack text (stdlib + Python docs only: listing them is fast)."""
    from runtime import haystacks, tasks as T

    texts = haystacks.iter_texts("heldout", 400_000, sources=("stdlib", "pydoc"))
    return T.TokenPool.from_texts(texts, tok)


def test_shipped_folder():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"):
        assert (MODEL / name).is_file(), name
    assert (MODEL / "model.safetensors").stat().st_size <= 50 * 1024 * 1024
    assert (MODEL / "tokenizer.json").read_bytes() == (REPO / "assets" / "tokenizer.json").read_bytes()


def _needle_case(model, tok, pool):
    from runtime import tasks as T

    rng = random.Random(2024)
    hay = pool.text(2000, rng)
    value = "5820417"
    sentence, voff = T.niah_sentence("access code", "misty lighthouse", value)
    text, spans = T.plant(hay, [(0.3, sentence)])
    content = text + "\n\n" + T.niah_question("access code", "misty lighthouse")
    ids = tok.render_chat([{"role": "user", "content": content}])
    assert 1800 < len(ids) < 2300
    cache = model.new_cache()
    runtime.prefill(model, ids[:-200], cache, chunk_size=700)  # chunked prefill of the haystack
    cap = runtime.Capture()
    out = ev.answer_ids(model, tok, ids[-200:], cache, 16, cap)
    _, offsets = tok.encode_with_offsets(content)
    vt = T.char_span_to_tokens(offsets, (spans[0][0] + voff, spans[0][0] + voff + len(value)), 2)
    recall, ranks = ev._selection(model, cap, len(ids) - 1, vt)
    return value, tok.decode(out, skip_special_tokens=True), recall, ranks


def test_needle_2k_selected(model, tok, pool):
    """End to end (chunked prefill, question, capture): the CSA top-k of the answer query holds the needle."""
    value, output, recall, ranks = _needle_case(model, tok, pool)
    assert recall == 1.0 and ranks[0] is not None and ranks[0] <= 8
    assert output and not output.isspace()  # it answers something (greedy, stops at EOS or the cap)


def test_needle_2k_answer_exact(model, tok, pool):
    value, output, _, _ = _needle_case(model, tok, pool)
    assert output == value


def test_evaluate_cells(model, tok, pool):
    res = ev.evaluate("niah", MODEL, lengths=[1024], depths=[0.2, 0.8], seed=3, n=1, model=model, tokenizer=tok,
                      pool=pool, per_haystack="all")  # one haystack, both needles in it
    assert [(r["length"], r["depth"]) for r in res] == [(1024, 0.2), (1024, 0.8)]
    for r in res:
        assert r["kind"] == "niah" and r["n"] == 1 and r["correct"] in (0, 1)
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
        assert r["rank"] is None or 1 <= r["rank"] <= model.config.index_topk
        assert abs(r["tokens"] - 1024) < 64
        ex = r["examples"][0]
        assert set(ex) >= {"question", "answer", "output", "ok", "recall", "ranks"}
    table = ev.format_table(res)
    assert "niah" in table and "1024" in table
    one = ev.evaluate("niah", MODEL, lengths=[1024], depths=[0.2, 0.8], seed=3, n=1, model=model, tokenizer=tok,
                      pool=pool, per_haystack="one")  # a haystack per depth, one needle in each
    assert [(r["length"], r["depth"], r["n"]) for r in one] == [(1024, 0.2, 1), (1024, 0.8, 1)]
    assert all(r["per_haystack"] == "one" and r["examples"][0]["question"] for r in one)
    assert {r["examples"][0]["answer"] for r in one}.isdisjoint({r["examples"][0]["answer"] for r in res})


def test_multi_key_multi_value_multi_query_and_kv_formats(model, tok, pool):
    """RULER's needle variants and kv per format, through the same path: K same-template facts with one
    asked (the others count against `first`), one key's V values and Q keys at once (scored as sets), and
    kv blocks in the formats asked, reported per format."""
    import random

    hay, qas = ev.build_case("niah", random.Random(1), pool, tok, 1500, [0.5], keys=5)
    (qa,) = qas
    assert len(qa.distractor_chars) == 4 and hay[slice(*qa.value_chars)] == qa.answer
    asked = qa.question.removeprefix("What is the ").split(" for the ")[0]
    for a, b in qa.distractor_chars:  # same template, other keys, other values
        line = hay[hay.rfind("\n", 0, a) + 1 : hay.find("\n", b)]
        assert line.startswith(f"The {asked} for the ") and hay[a:b] != qa.answer
    hay, (mv,) = ev.build_case("mv", random.Random(2), pool, tok, 1500, [0.0], keys=3)
    assert len(mv.values) == 3 == len(mv.more_chars) + 1
    assert [hay[a:b] for a, b in (mv.value_chars, *mv.more_chars)] == list(mv.values)
    assert mv.question.startswith("What are all the ")
    hay, (mq,) = ev.build_case("mq", random.Random(3), pool, tok, 1500, [1.0], keys=2)
    assert " and the " in mq.question and mq.answer == ", ".join(mq.values)
    with pytest.raises(ValueError, match="per-haystack one"):
        ev.build_case("mv", random.Random(2), pool, tok, 1500, [0.0, 1.0], keys=3)

    res = ev.evaluate("niah", MODEL, lengths=[1024], depths=[0.5], n=2, model=model, tokenizer=tok, pool=pool,
                      keys=4)
    assert res[0]["keys"] == 4 and res[0]["n"] == 2
    assert all(0.0 <= r["first"] <= 1.0 for r in res)
    for kind in ("mv", "mq"):
        (r,) = ev.evaluate(kind, MODEL, lengths=[1024], depths=[0.5], n=1, model=model, tokenizer=tok, pool=pool)
        ex = r["examples"][0]
        assert r["keys"] == {"mv": 4, "mq": 2}[kind]
        assert ex["ok"] == T.values_match(ex["output"], ex["answer"].split(", "))
        assert 0.0 <= r["recall"] <= 1.0
    (r,) = ev.evaluate("kv", MODEL, lengths=[1024], depths=[0.5], n=4, model=model, tokenizer=tok, pool=pool,
                       formats=("json", "code"))
    assert set(r["by_format"]) == {"json", "code"} and sum(c["n"] for c in r["by_format"].values()) == 4
    with pytest.raises(ValueError, match="kv formats"):
        ev.evaluate("kv", MODEL, lengths=[1024], n=1, model=model, tokenizer=tok, pool=pool, formats=("yaml",))


def test_eval_by_kind_of_text(model, tok):
    """--sources cuts the held-out haystacks from one kind of text only (source code, manuals, package
    documentation, a dictionary): the pool holds nothing else, and the cell says which."""
    from runtime import haystacks

    texts = haystacks.pinned_texts(200_000, sources=("gcide",))
    assert texts and all(not t.lstrip().startswith(("import", "#", '"""')) for t in texts)
    assert len(haystacks.pinned_texts(200_000, sources=("stdlib", "gcide"))) > len(texts)
    with pytest.raises(ValueError, match="sources"):
        haystacks.pinned_texts(1000, sources=("novels",))
    pool = T.TokenPool.corpus("heldout", 200_000, tok, sources=("gcide",))
    assert pool.name.endswith("gcide") and len(pool.ids) > 1000
    (r,) = ev.evaluate("niah", MODEL, lengths=[1024], depths=[0.5], n=1, model=model, tokenizer=tok,
                       sources=("gcide",))
    assert r["sources"] == ["gcide"] and r["n"] == 1
    args = ev.add_eval_arguments(__import__("argparse").ArgumentParser()).parse_args(["niah", "--sources",
                                                                                      "stdlib,pydoc"])
    assert args.sources == "stdlib,pydoc"


def test_values_match_is_a_set_match():
    assert T.values_match("4417, 8812 and 90.", ["90", "4417", "8812"])
    assert T.values_match('"QX-4471-B" and "AB-123"', ["AB-123", "QX-4471-B"])
    assert not T.values_match("4417, 8812", ["4417", "8812", "90"])  # one missing
    assert not T.values_match("4417, 4417, 8812", ["4417", "8812"])  # one twice
    assert not T.values_match("4417, 8812, 5", ["4417", "8812"])  # one too many


def test_eval_cli_arguments():
    import argparse
    ap = ev.add_eval_arguments(argparse.ArgumentParser())
    a = ap.parse_args(["kv", "--lengths", "4096,32k", "--depths", "0,0.5,1", "--seed", "7", "--haystack", "a", "b",
                       "--json"])
    assert a.kind == "kv" and a.lengths == [4096, 32768] and a.depths == [0.0, 0.5, 1.0]
    assert a.seed == 7 and a.haystack == ["a", "b"] and a.json
    with pytest.raises(SystemExit):
        ap.parse_args(["niah", "--depths", "1.5"])
    a = ap.parse_args(["mv", "--formats", "json,csv"])
    assert a.kind == "mv" and a.keys is None and ev.keys_for(a.kind, a.keys) == 4
    assert ev.keys_for("niah", None) == 1 and ev.keys_for("niah", 5) == 5 and ev.keys_for("mq", None) == 2


def test_eval_plot_and_merge(tmp_path):
    """--include merges earlier --json runs; --plot writes one heatmap cell per (length, depth)."""
    cells = [{"kind": "niah", "length": L, "depth": d, "n": 2, "accuracy": a, "recall": 1.0, "rank": 1.0,
              "first": 1.0, "tokens": L, "seconds": 1.0}
             for L, a in ((4096, 1.0), (1048576, 0.5)) for d in (0.0, 1.0)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(c) for c in cells[:2]) + "\n")
    (tmp_path / "b.jsonl").write_text("progress line\n" + "\n".join(json.dumps(c) for c in cells[2:]) + "\n")
    got = ev.load_results([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], "niah")
    assert got == cells and ev.load_results([tmp_path / "a.jsonl"], "kv") == []
    svg = ev.svg_heatmap(got, "niah")
    assert svg.startswith("<svg") and svg.count("<rect") == 1 + 4 and "1M tokens" in svg and "4k tokens" in svg
    cell = 'font-weight="600">{}</text>'
    assert svg.count(cell.format("1.00")) == 2 and svg.count(cell.format("0.50")) == 2


def test_ask_json_finds_a_needle_among_many_files(tmp_path, pool):
    """Issue 4's end-to-end bar with the shipped model: `python -m runtime ask --json` over 40 files of
    held-out text, a fact planted at a known line of one of them: the answer is the value, and that file,
    with a line range holding that line, is among the first three sources."""
    import subprocess

    rng = random.Random(11)
    tree = tmp_path / "notes"
    tree.mkdir()
    target, line_no = None, None
    for i in range(40):
        body = pool.text(300, rng).splitlines()
        if i == 23:
            line_no = len(body) // 2 + 1
            body.insert(line_no - 1, "The access code for the misty lighthouse is 5820417.")
            target = f"notes/part{i:02d}.txt"
        (tree / f"part{i:02d}.txt").write_text("\n".join(body) + "\n")
    argv = [sys.executable, "-m", "runtime", "ask", "--corpus", "notes", "--question",
            "What is the access code for the misty lighthouse?", "--max-new-tokens", "12", "--json"]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["timings"]["corpus_tokens"] > 8_000
    assert out["answer"].strip() == "5820417", out["answer"]
    top = out["sources"][:3]
    assert any(s["file"] == target and s["line_start"] <= line_no <= s["line_end"] for s in top), top


def test_two_hundred_stdlib_files_ingest_and_answer(tmp_path):
    """Issue 4: about 200 files of a real source tree (small CPython stdlib modules, ~77k tokens) ingest and
    answer with the shipped model: an answer, and sources that are files of that tree with real line ranges.
    (A fact planted in one of them is not reliably copied back at this size: see the model card.)"""
    from runtime.engine import Answer, Engine, GenerationParams

    lib = Path(json.__file__).parents[1]
    files = sorted(p for p in lib.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts
                   and 300 < p.stat().st_size < 2500)[:200]
    assert len(files) == 200
    lines_of = {}
    for p in files:
        dest = tmp_path / "lib" / p.relative_to(lib)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
        lines_of[str(p.relative_to(lib))] = len(p.read_bytes().splitlines())
    session = Engine.from_dir(MODEL, chunk_size=4096).new_session()
    report = session.load_corpus([tmp_path / "lib"])
    assert len(session.layout.documents) == 200 and report.tokens > 50_000 and not report.skipped
    answer = next(e for e in session.ask("What is the default timeout in seconds?",
                                         GenerationParams(max_new_tokens=12)) if isinstance(e, Answer))
    assert answer.text.strip() and answer.provenance.sources
    for src in answer.provenance.sources:
        rel = next(k for k in lines_of if src.file.endswith(k))
        assert 1 <= src.line_start <= src.line_end <= lines_of[rel] + 1
