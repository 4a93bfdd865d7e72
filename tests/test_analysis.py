"""app/analysis.py (coverage over a conversation, comparing two answers) and the HTML the inspector shows
of them (app/render.py), on small hand-made inputs: no gradio, no model.

Context positions as in tests/test_inspector_view.py (one token per line, offset 2):

    context 2        "### File: a.py"          context 13        "### File: b.md"
    context 3-10     a.py lines 1-8            context 14-17     b.md lines 1-4
    context 11-12    separator                 context 18-19     separator

so the documents' text is a.py [3, 11) and b.md [14, 18). CSA layers 1 and 3 have rate 4: entry w covers
context [4w, 4w + 4); a.py's text meets entries 0-2, b.md's entries 3-4.
"""

import re
from types import SimpleNamespace

import numpy as np
import pytest

from app import analysis as A
from app import render as R
from runtime.corpus import Corpus, Document, Layout

OFFSET = 2
DOCS = [("a.py", 3, 11), ("b.md", 14, 18)]


def line_tokens(text: str):
    spans = [m.span() for m in re.finditer(r"[^\n]*\n|[^\n]+", text)]
    return list(range(1, len(spans) + 1)), spans


@pytest.fixture(scope="module")
def layout():
    corpus = Corpus([Document("a.py", "\n".join(f"alpha line {i}" for i in range(1, 9)) + "\n", "code"),
                     Document("b.md", "\n".join(f"beta line {i}" for i in range(1, 5)) + "\n", "markdown")])
    return Layout.build(corpus, line_tokens)


def provenance(n_context=24, csa=None, counts=None):
    """What summarize reads of a runtime Provenance."""
    csa = csa or {1: np.array([0, 0.5, 0.25, 0, 0.1, 0]), 3: np.array([0, 0, 0, 0, 0.4, 0])}
    counts = counts or {1: np.array([0, 3, 1, 0, 2, 0]), 3: np.array([0, 0, 0, 0, 1, 0])}
    return SimpleNamespace(n_context=n_context, rates={1: 4, 2: 8, 3: 4}, csa=csa, csa_counts=counts)


def summary(picks: dict, n_context: int = 28, rates=None) -> A.TurnSummary:
    """A TurnSummary from {layer: {entry: weight}}."""
    return A.TurnSummary(n_context, rates or {l: 4 for l in picks},
                         {l: (np.array(sorted(p), np.int32), np.array([p[k] for k in sorted(p)], np.float32))
                          for l, p in picks.items()})


FIRST = summary({1: {1: 0.5, 2: 0.25, 4: 0.1}, 3: {4: 0.4}}, n_context=24)  # = summarize(provenance())
SECOND = summary({1: {0: 0.25, 3: 0.75}})  # a later answer: the context is 28 tokens long


# ------------------------------------------------------------------------------------ one answer
def test_summarize_keeps_the_picked_entries():
    s = A.summarize(provenance())
    assert s.n_context == 24 and s.rates == {1: 4, 3: 4}  # CSA layers only (HCA layer 2 has no picks)
    assert s.picks[1][0].tolist() == [1, 2, 4] and s.picks[1][1].tolist() == pytest.approx([0.5, 0.25, 0.1])
    assert s.picks[1][0].dtype == np.int32 and s.picks[1][1].dtype == np.float32
    assert s.picks[3][0].tolist() == [4]
    assert s.nbytes == 3 * 4 * 2 + 4 * 2
    assert s.dense(1).tolist() == pytest.approx([0, 0.5, 0.25, 0, 0.1, 0])
    assert s.dense(3, 28).tolist() == pytest.approx([0, 0, 0, 0, 0.4, 0, 0])  # a longer context: zeros after
    assert s.picked(1) == {1, 2, 4} and s.picked(7) == set()
    assert A.summarize(None) is None
    # picked but given no weight (it underflowed): still read; weighted but never picked cannot happen
    s = A.summarize(provenance(csa={1: np.array([0.0, 0.0])}, counts={1: np.array([0, 2])}))
    assert s.picks[1][0].tolist() == [1] and s.picks[1][1].tolist() == [0.0]


def test_within_budget_keeps_the_newest():
    assert A.within_budget([10, 20, 30], 50) == 1  # 30 + 20 fit, the oldest goes
    assert A.within_budget([10, 20, 30], 60) == 0
    assert A.within_budget([10, 20, 30], 5) == 2  # the newest stays whatever its size
    assert A.within_budget([], 5) == 0


def test_a_conversation_keeps_its_summaries_within_budget(monkeypatch):
    from app.workspace import TurnView, Workspace

    ws = Workspace("k", None, None)
    ws.turns = [TurnView(f"q{i}", summary=FIRST) for i in range(4)]  # 32 bytes each
    monkeypatch.setattr(A, "SUMMARY_BYTES", 70)
    ws._bound_summaries()
    assert [t.summary is not None for t in ws.turns] == [False, False, True, True]
    ins = ws.inspector()
    assert ins.recorded() == [2, 3] and ins.questions == ["q0", "q1", "q2", "q3"]


# ------------------------------------------------------------------------------------ coverage
def test_coverage_of_one_answer(layout):
    cov = A.coverage([FIRST], 24, 4, DOCS, layout, OFFSET)
    a, b = cov.docs
    assert (a.name, a.entries, a.read, b.name, b.entries, b.read) == ("a.py", 3, 2, "b.md", 2, 1)
    assert (cov.entries, cov.read, cov.share, cov.answers) == (5, 3, 0.6, 1)
    # entry 1 (0.5) lies in a.py; 3 of entry 2's tokens are a.py's (0.25 * 3/4); entry 4 of layers 1 and 3
    # has 2 tokens of b.md: (0.1 + 0.4) * 2/4
    assert a.mass == pytest.approx(0.6875) and b.mass == pytest.approx(0.25)
    assert a.mass_share == pytest.approx(0.6875 / 0.9375) and b.mass_share == pytest.approx(0.25 / 0.9375)
    # never read: entry 0 (context 0-3: only a.py's line 1 is text) and entry 3 (context 12-15: b.md lines 1-2)
    assert a.regions == [A.Region("a.py", 1, 1, 3, 4)]
    assert b.regions == [A.Region("b.md", 1, 2, 14, 16)]
    assert b.regions[0].target == "file:b.md:1-2" and a.regions[0].target == "file:a.py:1"
    assert cov.regions() == [A.Region("b.md", 1, 2, 14, 16), A.Region("a.py", 1, 1, 3, 4)]  # longest first
    assert cov.read_any.tolist() == [False, True, True, False, True, False]


def test_coverage_over_a_conversation(layout):
    cov = A.coverage([FIRST, None, SECOND], 28, 4, DOCS, layout, OFFSET)  # None: an answer with no record
    a, b = cov.docs
    assert cov.answers == 2 and (a.read, b.read) == (3, 2) and a.regions == b.regions == [] and cov.share == 1.0
    assert a.mass == pytest.approx(0.6875 + 0.25 * 1 / 4)  # entry 0: one token of a.py's text
    assert b.mass == pytest.approx(0.25 + 0.75 * 2 / 4)  # entry 3: two tokens of b.md's text
    assert [m.tolist() for m in cov.read_masks] == [[False, True, True, False, True, False, False],
                                                    [True, False, False, True, False, False, False]]
    empty = A.coverage([], 28, 4, DOCS, layout, OFFSET)
    assert empty.answers == 0 and empty.read == 0 and empty.mass == 0 and empty.docs[0].mass_share == 0
    assert empty.docs[0].regions == [A.Region("a.py", 1, 8, 3, 11)]  # nothing read: all of its text


def test_unread_regions_are_maximal_runs_longest_first():
    s = summary({1: {2: 1.0, 3: 1.0, 7: 1.0}}, n_context=40)
    cov = A.coverage([s], 40, 4, [("x", 0, 40)])  # no layout: no lines
    assert [(r.token_start, r.token_end) for r in cov.docs[0].regions] == [(16, 28), (0, 8), (32, 40)]
    assert cov.docs[0].share == 0.3
    # a document's text that starts and ends inside entries: the runs are cut to it
    cov = A.coverage([s], 40, 4, [("x", 2, 30)])
    assert [(r.token_start, r.token_end) for r in cov.docs[0].regions] == [(16, 28), (2, 8)]


def test_coverage_grid_takes_coarser_rates():
    s = summary({5: {1: 1.0}}, n_context=32, rates={5: 8})  # an 8-token entry covers grid entries 2 and 3
    assert A.read_mask(s, 32, 4).tolist() == [False, False, True, True, False, False, False, False]
    with pytest.raises(ValueError, match="whole entries"):
        A.read_mask(summary({5: {1: 1.0}}, rates={5: 6}), 32, 4)


def test_text_spans(layout):
    assert A.text_spans(layout, OFFSET) == DOCS and A.text_spans(None, 0) == []


# ------------------------------------------------------------------------------------ two answers
def src(file, a, b, weight=0.5):
    return SimpleNamespace(file=file, line_start=a, line_end=b, weight=weight, layers=(1,), snippet=f"{file} {a}")


def test_compare_two_answers():
    other = summary({1: {1: 0.5, 3: 0.5}, 3: {4: 0.4}})
    c = A.compare(FIRST, other, [src("a.py", 2, 5), src("b.md", 3, 4)], [src("b.md", 4, 4), src("a.py", 6, 8)])
    assert c.n_context == 28 and c.layers == [1, 3]
    assert c.a[1].tolist() == pytest.approx([0, 0.5, 0.25, 0, 0.1, 0, 0])  # on the longer context
    assert c.diff[1].tolist() == pytest.approx([0, 0, -0.25, 0.5, -0.1, 0, 0])
    assert c.counts == {1: (2, 1, 1), 3: (0, 1, 0)}
    assert c.jaccard == {1: 0.25, 3: 1.0} and c.overall == pytest.approx(2 / 5)
    # shares of each side's weight: layer 1 entry 1 min(0.5/1.25, 0.5/1.4), layer 3 entry 4 min(0.4/1.25, 0.4/1.4)
    assert c.weighted == pytest.approx(0.9 / 1.4)
    assert c.shared == [(1, 0)]  # b.md 3-4 meets b.md 4-4; a.py 2-5 and a.py 6-8 do not meet


def test_compare_edge_cases():
    c = A.compare(FIRST, FIRST)
    assert c.overall == 1.0 and c.weighted == pytest.approx(1.0) and not any(np.any(d) for d in c.diff.values())
    nothing = summary({1: {}}, n_context=24)
    c = A.compare(nothing, nothing)
    assert c.counts == {1: (0, 0, 0)} and np.isnan(c.jaccard[1]) and np.isnan(c.overall) and np.isnan(c.weighted)
    c = A.compare(FIRST, summary({7: {0: 1.0}}))  # layers one side lacks count as picking nothing
    assert c.counts[7] == (0, 0, 1) and c.counts[3] == (1, 0, 0) and c.overall == 0.0
    assert A.shared_sources([src("a.py", 1, 3)], [src("a.py", 3, 9), src("b.md", 1, 3)]) == [(0, 0)]


# ------------------------------------------------------------------------------------ what the page shows
def test_token_chips():
    html = R.token_chips([(0, "53"), (1, " <b>"), (2, "\n"), (3, "")], (1, 2))
    assert 'data-ll-tok="all"' in html and 'data-ll-tok="3"' in html
    assert "·&lt;b&gt;" in html and "<b>" not in html  # the model's text, escaped
    assert re.findall(r'class="ll-tok( ll-tok-on)?" data-ll-tok="(\d)"', html) == [
        ("", "0"), (" ll-tok-on", "1"), (" ll-tok-on", "2"), ("", "3")]
    assert "⏎" in html and "∅" in html
    assert 'll-tok-all ll-tok-on' in R.token_chips([(0, "a")], None)
    assert 'class="ll-tok ll-tok-on" data-ll-tok="0"' in R.token_chips([(0, "a"), (1, "b")], 0)
    assert "click one" in R.token_chips([])


def test_coverage_html(layout):
    cov = A.coverage([FIRST], 24, 4, DOCS, layout, OFFSET)
    table = R.coverage_table(cov)
    assert 'data-ll-open="file:b.md:1-2"' in table and 'data-ll-open="file:a.py:1"' in table
    assert "2 / 3" in table and "66.7%" in table and "1 / 2" in table
    assert table.index("Never read, longest first") < table.index("b.md:1-2") < table.index("a.py:1<")
    row = table[table.index("<tbody>"):]  # in a document's row, its regions' lines only
    assert re.search(r'data-ll-open="file:b\.md:1-2" title="never read: b\.md lines 1-2, 2 tokens">1-2</button>', row)
    summary_html = R.coverage_summary(cov, 3)
    assert "<b>3</b> of the corpus" in summary_html and "<b>60.0%</b>" in summary_html
    assert "(2 other answers not recorded)" in summary_html  # reloaded from a snapshot, or over the memory budget
    assert "Ask a question" in R.coverage_summary(A.coverage([], 24, 4, DOCS, layout, OFFSET), 0)
    assert R.coverage_table(A.coverage([], 24, 4, DOCS, layout, OFFSET)) == ""


def test_compare_html():
    sa, sb = [src("a.py", 2, 5), src("b.md", 3, 4)], [src("b.md", 4, 4), src("a.py", 6, 8)]
    c = A.compare(FIRST, summary({1: {1: 0.5, 3: 0.5}, 3: {4: 0.4}}), sa, sb)
    html = R.compare_summary(c, 0, 2, sa, sb)
    assert '<b class="ll-overlap-value">0.40</b>' in html and "L1 0.25 · L3 1.00" in html and "<b>64%</b>" in html
    assert 'class="ll-chip ll-shared" data-ll-open="src:0:1"' in html  # b.md 3-4 of answer 1...
    assert 'class="ll-chip ll-shared" data-ll-open="src:2:0"' in html  # ...meets b.md 4 of answer 3
    assert 'class="ll-chip" data-ll-open="src:0:0"' in html
    assert "Ask two questions" in R.compare_summary(None, 0, 0, (), ())
