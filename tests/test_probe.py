"""Needles in the user's own documents (runtime/probe.py): planting leaves the files alone and puts each
fact in its document at its depth, the value's token span is where the value is, and the grid on the
shipped model is what a Session answers to the same questions; `eval niah --haystack-dir` prints it."""

import hashlib
import json
import shutil
import threading

import pytest

from helpers import ASSETS, drain

from runtime import Cancelled, EngineError, GenerationParams, ingest
from runtime.__main__ import main
from runtime.corpus import Layout
from runtime.probe import needle_grid, plant_needles, resolve_depths, select_documents

DEPTHS = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """assets/examples (four small files of four kinds, two of which already hold a fact of the needle's form)."""
    folder = tmp_path_factory.mktemp("probe") / "examples"
    shutil.copytree(ASSETS / "examples", folder)
    return folder


@pytest.fixture(scope="module")
def grid(shipped_engine, docs):
    return needle_grid(shipped_engine, ingest([docs]), DEPTHS, seed=0)


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_planting_changes_copies_only(docs):
    before = _hashes(docs)
    corpus = ingest([docs])
    texts = [d.text for d in corpus.documents]
    planted, needles = plant_needles(corpus, DEPTHS, seed=0)
    assert _hashes(docs) == before  # the files on disk
    assert [d.text for d in corpus.documents] == texts  # and the corpus planted from
    assert [d.name for d in planted.documents] == [d.name for d in corpus.documents]
    assert len(needles) == 4 * len(DEPTHS)
    assert [(n.doc_index, n.depth) for n in needles] == [(i, x) for i in range(4) for x in DEPTHS]
    assert len({n.key for n in needles}) == len({n.value for n in needles}) == len(needles)
    whole = "\n".join(texts).lower()
    for n in needles:
        assert n.entity not in whole and n.value not in whole  # one answer per question, the planted one
        text, orig = planted.documents[n.doc_index].text, texts[n.doc_index]
        a, b = n.char_span
        assert text[a:b] == n.value and n.sentence in text and n.question.startswith("What is the ")
        start = text.index(n.sentence)
        assert (start == 0 or text[start - 1] == "\n") and text.count("\n", 0, start) + 1 == n.line
        assert sum(n.key in d.text for d in planted.documents) == 1  # in its own document only
        # where it went in the original text: the line start at or before the asked depth
        before_it = [m for m in needles if m.doc_index == n.doc_index and m.depth < n.depth]
        closes_last_line = start == len(text) - len(n.sentence) - 1 and not orig.endswith("\n")
        o = start - sum(len(m.sentence) + 1 for m in before_it) - closes_last_line
        cut = round(n.depth * len(orig))
        assert o <= cut and "\n" not in orig[o:cut], (n.document, n.depth, o, cut)
    again, same = plant_needles(corpus, DEPTHS, seed=0)
    assert same == needles and [d.text for d in again.documents] == [d.text for d in planted.documents]
    assert {n.value for n in plant_needles(corpus, DEPTHS, seed=1)[1]}.isdisjoint({n.value for n in needles})


def test_documents_and_depths_arguments(docs):
    corpus = ingest([docs])
    assert select_documents(corpus, None) == [0, 1, 2, 3]
    assert select_documents(corpus, 2) == [0, 3] and select_documents(corpus, 9) == [0, 1, 2, 3]
    assert select_documents(corpus, ["tides.csv", "examples/harbor.py"]) == [0, 3]
    with pytest.raises(EngineError, match="no document 'missing.md'"):
        select_documents(corpus, ["missing.md"])
    assert resolve_depths(3) == [0.0, 0.5, 1.0] and resolve_depths(1) == [0.5]
    with pytest.raises(EngineError):
        resolve_depths([0.5, 1.5])


def test_misses_are_told_apart():
    """A wrong answer is named for what it copied: another planted fact, its own value cut short, text of
    the documents (such as a fact of the same form that was there before), or nothing recognisable."""
    from runtime.corpus import Corpus, Document
    from runtime.probe import Needle, NeedleCell, _classify, _CorpusText

    text = "intro\nThe access code for the old mill is 3319024.\n"
    corpus = _CorpusText(Corpus([Document("a.md", text, "markdown")]))
    values = {0: "4471930", 1: "929347"}

    def miss(output, selected=True, me=0):
        n = Needle("b.md", 0, 0.5, 3, "PIN", "misty pier", values[me], "", "", (0, 0))
        cell = NeedleCell(n, output, [], "eos", output.strip() == n.value, (0, 1), 10, 1.0 if selected else 0.0,
                          [1 if selected else None], False, None)
        _classify(cell, values, me, corpus)
        return cell.miss, cell.confused_with, cell.corpus_match

    assert miss("4471930") == (None, None, None)
    assert miss("929347") == ("another_fact", 1, None) and miss("9297") == ("another_fact", 1, None)
    assert miss("447193") == ("copy_slip", None, None) and miss("4471830") == ("copy_slip", None, None)
    assert miss("3319024") == ("corpus_value", None, ("a.md", 2, "3319024"))
    assert miss("3319027") == ("corpus_value", None, ("a.md", 2, "3319024"))  # a slipped copy of it
    assert miss("1.", selected=False) == ("not_selected", None, None) and miss("\n\n") == ("wrong", None, None)


def test_value_spans_are_the_value_tokens(grid, shipped_engine, docs):
    """A cell's value_tokens index the value in the context the session prefilled (preamble + layout)."""
    tok = shipped_engine.tokenizer
    planted, needles = plant_needles(ingest([docs]), DEPTHS, seed=0)
    ids = shipped_engine.preamble + list(Layout.build(planted, tok.encode_with_offsets).ids)
    assert [c.needle for c in grid.cells] == needles
    for c in grid.cells:
        a, b = c.value_tokens
        assert tok.decode(ids[a:b]).strip() == c.needle.value and c.context_tokens == len(ids)


def test_grid_cells_and_summary(grid):
    assert grid.total == 12 and [d.rsplit("/", 1)[1] for d in grid.documents] == \
        ["harbor.py", "lighthouse_log.md", "notes.txt", "tides.csv"]
    assert [len(cells) for _, cells in grid.rows()] == [3] * 4
    for c in grid.cells:
        assert isinstance(c.output, str) and c.ok == (c.output.strip() == c.needle.value)
        assert c.recall is not None and len(c.ranks) == 1 and c.first is not None
        assert (c.miss is None) == c.ok and (c.confused_with is None) == (c.miss != "another_fact")
        assert c.rank is None or 1 <= c.rank <= grid.index_topk
    last = grid.cell(grid.documents[-1], 1.0)
    assert last.in_window  # the needle right before the question
    d = json.loads(json.dumps(grid.to_dict()))
    assert d["total"] == 12 and d["found"] == grid.found and len(d["cells"]) == 12 and d["per_context"] == "all"
    summary = " ".join(grid.summary())
    assert f"Found {grid.found} of 12" in summary and "other 11 as distractors" in summary
    table = grid.format_table()
    assert table.splitlines()[0].split() == ["document", "@0.00", "@0.50", "@1.00"]
    rows = table.splitlines()[2:6]
    assert rows[1].startswith("lighthouse_log.md ") and sum(r.split().count("ok") + r.split().count("MISS")
                                                           for r in rows) == 12


def test_grid_is_what_a_session_answers(grid, shipped_engine, docs):
    """Every cell's answer tokens are those a chat session answers to the same question over the same
    planted corpus (the app's path: Session.load_corpus, ask, reset_chat)."""
    planted, _ = plant_needles(ingest([docs]), DEPTHS, seed=0)
    session = shipped_engine.new_session()
    session.load_corpus(planted)
    tok = shipped_engine.tokenizer
    for c in grid.cells:
        params = GenerationParams(max_new_tokens=len(tok.encode(c.needle.value)) + 8)
        _, answer = drain(session.ask(c.needle.question, params))
        assert answer.token_ids == c.answer_ids, c.needle
        assert (answer.text.strip() == c.needle.value) == c.ok
        session.reset_chat()


def test_selection_is_eval_niahs(shipped_engine, docs):
    """The probe's ranks are runtime/evaluate.py's _selection on the same capture."""
    from runtime import Capture
    from runtime.evaluate import _selection
    from runtime.introspect import span_ranks
    from runtime.probe import _ask, _value_tokens

    planted, needles = plant_needles(ingest([docs]), [0.3], documents=2, seed=4)
    session = shipped_engine.new_session()
    session.load_corpus(planted)
    spans = _value_tokens(session, needles)
    cap = Capture()
    _, _, query = _ask(session, needles[0].question, 4, cap)
    assert session.cache.length == session.corpus.mark.length  # rewound to the corpus
    ranks = span_ranks(cap, shipped_engine.config, query, spans)
    for span, r in zip(spans, ranks):
        recall, expect = _selection(shipped_engine.model, cap, query, span)
        assert r == expect and recall == sum(x is not None for x in r) / len(r)


def test_one_needle_per_context(shipped_engine, docs, grid):
    one = needle_grid(shipped_engine, ingest([docs]), [0.5], documents=["notes.txt", "tides.csv"], seed=0,
                      per_context="one")
    assert one.total == 2 and one.per_context == "one" and all(c.first is None for c in one.cells)
    assert all(c.context_tokens < grid.context_tokens for c in one.cells)  # one needle each, not twelve
    assert "context of its own" in one.summary()[0]


def test_stop_before_prefill(shipped_engine, docs):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        needle_grid(shipped_engine, ingest([docs]), [0.5], documents=1, stop=stop)


def test_cli_haystack_dir_json(capsys, docs):
    before = _hashes(docs)
    code = main(["eval", "niah", "--haystack-dir", str(docs), "--depths", "0,1", "--documents", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (line,) = out.strip().splitlines()
    d = json.loads(line)
    assert d["total"] == 4 and d["depths"] == [0.0, 1.0] and len(d["documents"]) == 2
    assert d["documents"][0].endswith("harbor.py") and d["documents"][1].endswith("tides.csv")
    assert {"ok", "output", "selected", "rank", "line", "question", "value"} <= set(d["cells"][0])
    assert d["summary"][1].startswith(f"Found {d['found']} of 4") and _hashes(docs) == before
    code = main(["eval", "niah", "--haystack-dir", str(docs), "--depths", "0.5", "--documents", "notes.txt",
                 "--per-haystack", "one"])
    out, _ = capsys.readouterr()
    assert code == 0 and out.splitlines()[0].split() == ["document", "@0.50"] and "notes.txt" in out


@pytest.mark.parametrize("argv, message", [
    (["niah", "--haystack-dir", "/nonexistent/dir"], "no such file or directory"),
    (["kv", "--haystack-dir", "."], "use it with `eval niah`"),
    (["niah", "--documents", "2"], "give that folder too"),
    (["niah", "--haystack-dir", ".", "--haystack", "x"], "give one of them"),
])
def test_cli_haystack_dir_bad_input(capsys, argv, message):
    code = main(["eval", *argv, "--json"])
    out, _ = capsys.readouterr()
    assert code == 2 and message in json.loads(out)["error"]
