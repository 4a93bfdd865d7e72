"""app/inspector_view.py, the inspector's view-model, on small hand-made inputs: no gradio, no model.

The corpus is a real runtime Layout (runtime/corpus.py is pure) built with a toy tokenizer that makes
one token of each line, so every position below can be checked by hand:

    context 0-1      preamble (offset 2)
    context 2        "### File: a.py"          context 13        "### File: b.md"
    context 3-10     a.py lines 1-8            context 14-17     b.md lines 1-4
    context 11-12    separator                 context 18-19     separator
    context 20-23    the conversation

CSA layers 1 and 3 (rate 4: entry w covers context [4w, 4w + 4)), HCA layer 2 (rate 8).
"""

import re
from types import SimpleNamespace

import numpy as np
import pytest

from app import inspector_view as V
from app.errors import InputError
from runtime.corpus import Corpus, Document, Layout

A_LINES = [f"alpha line {i}" for i in range(1, 9)]
B_LINES = [f"beta line {i}" for i in range(1, 5)]
OFFSET = 2
N_CONTEXT = 24


def line_tokens(text: str):
    """One token per line (its newline included): ids and (start, end) character offsets."""
    spans = [m.span() for m in re.finditer(r"[^\n]*\n|[^\n]+", text)]
    return list(range(1, len(spans) + 1)), spans


@pytest.fixture(scope="module")
def layout():
    corpus = Corpus([Document("a.py", "\n".join(A_LINES) + "\n", "code"),
                     Document("b.md", "\n".join(B_LINES) + "\n", "markdown")])
    lay = Layout.build(corpus, line_tokens)
    a, b = lay.documents
    assert (a.token_start, a.text_start, a.text_end, b.token_start, b.text_start, b.text_end) == (0, 1, 9, 11, 12, 16)
    return lay


def provenance():
    """A runtime Provenance, small enough to check by hand."""
    from runtime.provenance import Provenance, TokenProvenance

    csa = {1: np.array([0, 0.5, 0.25, 0, 0.1, 0]), 3: np.array([0, 0, 0, 0, 0.4, 0])}
    counts = {1: np.array([0, 3, 1, 0, 2, 0]), 3: np.array([0, 0, 0, 0, 1, 0])}
    tok = lambda i, text, entries: TokenProvenance(i, 40 + i, 100 + i, text, entries, [])
    tokens = [tok(0, "53", {1: (np.array([1, 4]), np.array([0.7, 0.2])),
                            3: (np.array([4, 9]), np.array([0.3, 0.05])),  # entry 9: past the context, dropped
                            2: (np.array([0, 2]), np.array([0.6, 0.1]))}),
              tok(1, "<b>", {1: (np.array([2]), np.array([1.0])), 3: (np.array([], int), np.array([])),
                             2: (np.array([1]), np.array([0.9]))})]
    return Provenance(N_CONTEXT, OFFSET, {1: 4, 2: 8, 3: 4}, csa, counts, {2: np.array([0.2, 0.3, 0.1])},
                      {1: (0.5, 0.4, 0.1), 2: (0.6, 0.3, 0.1), 3: (0.2, 0.7, 0.1)}, [], tokens,
                      [("a.py", 2, 13), ("b.md", 13, 20)])


def source(file, a, b, weight=0.6, layers=(1, 3)):
    return SimpleNamespace(file=file, line_start=a, line_end=b, weight=weight, layers=layers)


SHAPE = V.Shape(window=8, csa_rate=4, hca_rate=8, rates={0: 0, 1: 4, 2: 8, 3: 4})


def inspector(layout, sources=((),), prov="default"):
    return V.Inspector(layout, OFFSET, provenance() if prov == "default" else prov, list(sources), SHAPE, N_CONTEXT)


# ------------------------------------------------------------------------------------ pure
# ------------------------------------------------------------------------------------ selection
def test_selection_of_the_whole_answer():
    prov = provenance()
    csa, hca = V.selection(prov, None)
    assert sorted(csa) == [1, 3] and csa[1].tolist() == [0, 0.5, 0.25, 0, 0.1, 0]
    assert hca[2].tolist() == [0.2, 0.3, 0.1]
    counts, _ = V.selection(prov, None, counts=True)
    assert counts[1].tolist() == [0, 3, 1, 0, 2, 0]
    assert V.selection(None, None) == ({}, {})


def test_selection_of_one_token():
    prov = provenance()
    csa, hca = V.selection(prov, 0)
    assert csa[1].tolist() == [0, 0.7, 0, 0, 0.2, 0]
    assert csa[3].tolist() == [0, 0, 0, 0, 0.3, 0]  # the pick past the context is dropped
    assert hca[2].tolist() == [0.6, 0, 0.1]
    csa, hca = V.selection(prov, 0, counts=True)
    assert csa[1].tolist() == [0, 1, 0, 0, 1, 0]  # one per pick...
    assert hca[2].tolist() == [0.6, 0, 0.1]  # ...HCA has no picks: its weights stay
    csa, _ = V.selection(prov, 1)
    assert csa[3].tolist() == [0] * 6 and csa[1].tolist() == [0, 0, 1, 0, 0, 0]


def test_cells_map_to_entries_and_positions():
    prov = provenance()
    # under the column cap a column is one entry
    assert V.cell_entries(4, N_CONTEXT, 1) == (1, 2)
    assert V.cell_position(prov, 1, 1, None) == 4 and V.cell_position(prov, 1, 4, None) == 16
    assert V.cell_position(prov, 1, 0, None) is None  # nothing picked there
    assert V.cell_position(prov, 1, 6, None) is None  # past the last column
    # two columns: three entries each; the heaviest pick in the cell wins
    assert V.cell_entries(4, N_CONTEXT, 0, columns=2) == (0, 3) and V.cell_entries(4, N_CONTEXT, 2, columns=2) is None
    assert V.cell_position(prov, 1, 0, None, columns=2) == 4
    assert V.cell_position(prov, 1, 1, None, columns=2) == 16
    assert V.cell_position(prov, 1, 0, 1, columns=2) == 8  # token 1 picked entry 2 only
    assert V.cell_position(prov, 3, 0, None) is None and V.cell_position(prov, 7, 0, None) is None  # not a CSA layer
    assert V.cell_position(None, 1, 1, None) is None


def test_focus():
    assert V.parse_focus(V.WHOLE, 2) is None and V.parse_focus(None, 2) is None and V.parse_focus("", 2) is None
    assert V.parse_focus("1", 2) == 1 and V.parse_focus(0, 2) == 0
    assert V.parse_focus("2", 2) is None and V.parse_focus("-1", 2) is None and V.parse_focus("x", 2) is None
    assert V.focus_choices(None) == [("Whole answer", "all")]
    assert V.focus_choices(provenance()) == [("Whole answer", "all"), ("#0 '53'", "0"), ("#1 '<b>'", "1")]


def test_focus_on_a_span():
    assert V.parse_focus("0-1", 2) == (0, 1) and V.parse_focus((1, 0), 2) == (0, 1)
    assert V.parse_focus(" 0-1 ", 2) == (0, 1)
    assert V.parse_focus("1-1", 2) == 1  # a span of one token is that token
    for bad in ("0-2", "a-b", "1--2", (0, 5), "-1-1"):
        assert V.parse_focus(bad, 2) is None, bad
    assert V.focus_tokens(None) is None and V.focus_tokens(1) == [1] and V.focus_tokens((2, 4)) == [2, 3, 4]
    assert [V.focus_value(f) for f in (None, 1, (0, 1))] == ["all", "1", "0-1"]
    prov = provenance()
    assert V.focus_label(prov, (0, 1)) == "answer tokens #0–#1 '53<b>'" and V.focus_label(prov, None) == ""
    assert V.focus_choices(prov, (0, 1))[:2] == [("Whole answer", "all"), ("#0–#1 '53<b>'", "0-1")]
    assert V.answer_tokens(prov) == [(0, "53"), (1, "<b>")] and V.answer_tokens(None) == []
    assert V.span_text(prov, (0, 1), limit=3) == "53…"


def test_selection_of_a_span():
    prov = provenance()
    csa, hca = V.selection(prov, (0, 1))
    assert csa[1].tolist() == [0, 0.7, 1.0, 0, 0.2, 0] and csa[3].tolist() == [0, 0, 0, 0, 0.3, 0]
    assert hca[2].tolist() == pytest.approx([0.6, 0.9, 0.1])
    counts, _ = V.selection(prov, (0, 1), counts=True)
    assert counts[1].tolist() == [0, 1, 1, 0, 1, 0]
    assert V.cell_position(prov, 1, 0, (0, 1), columns=2) == 8  # entry 2 (1.0) outweighs entry 1 (0.7)


# ------------------------------------------------------------------------------------ corpus text
def test_describe_names_file_and_lines(layout):
    assert V.describe(layout, OFFSET, 4, 8) == "a.py:2-5"
    assert V.describe(layout, OFFSET, 0, 4) == "a.py:1-1"  # the preamble is no file
    assert V.describe(layout, OFFSET, 8, 16) == "a.py:6-8; b.md:1-2"
    assert V.describe(layout, OFFSET, 12, 14) == "b.md (header)"
    assert V.describe(layout, OFFSET, 20, 24) == "" and V.describe(None, 0, 0, 4) == ""


def test_line_heat_shares_an_entry_among_its_lines(layout):
    prov = provenance()
    csa, _ = V.selection(prov, None)
    heat = V.line_heat(csa, prov.rates, layout, OFFSET, 0)
    # entry 1 (0.5) covers a.py lines 2-5; entry 2 (0.25) lines 6-8 (and a separator token)
    assert heat == pytest.approx({2: 0.125, 3: 0.125, 4: 0.125, 5: 0.125, 6: 0.25 / 3, 7: 0.25 / 3, 8: 0.25 / 3})
    heat = V.line_heat(csa, prov.rates, layout, OFFSET, 1)
    assert heat == pytest.approx({3: (0.1 + 0.4) / 2, 4: (0.1 + 0.4) / 2})  # entry 4, in layers 1 and 3


def test_window_is_centred_and_clamped():
    lines = [f"l{i}" for i in range(1, 11)]
    v = V.window("x", lines, 5, 6, {5: 2.0, 9: 4.0}, "cap", size=4)
    assert (v.first_line, v.lines, v.target, v.total_lines, v.caption) == (3, ["l3", "l4", "l5", "l6"], (5, 6), 10, "cap")
    assert v.heat == [0, 0, 0.5, 0]  # scaled by the document's hottest line (9), shown or not
    v = V.window("x", lines, 40, 2, {}, size=4)  # past the end, reversed: clamped to the last line
    assert (v.first_line, v.target, v.heat) == (7, (10, 10), [0, 0, 0, 0])
    v = V.window("x", lines, 1, 1, {}, size=160)
    assert v.first_line == 1 and len(v.lines) == 10


# ------------------------------------------------------------------------------------ viewer targets
def test_parse_target():
    assert V.parse_target("src:2:1") == V.Target("src", 2, 1)
    assert V.parse_target("cell:3:17") == V.Target("cell", 3, 17)
    assert V.parse_target("pos:1024") == V.Target("pos", 1024)
    assert V.parse_target("file:dir/a:b.py:12") == V.Target("file", 12, name="dir/a:b.py")  # ':' in a name
    assert V.parse_target("file:a-b.py:3-9") == V.Target("file", 3, 9, name="a-b.py")  # a range of lines
    for bad in ("", "src:1", "cell:a:b", "pos:", "file:x.py", "file::3", "open:1", "file:x.py:3-", "file:x.py:3-a",
                None):
        with pytest.raises(InputError, match="nothing to open"):
            V.parse_target(bad)


def test_open_a_source_chip(layout):
    ins = inspector(layout, sources=[[source("a.py", 2, 5)], [source("b.md", 3, 4, weight=0.25, layers=(3,))]])
    v = ins.open("src:1:0", None)
    assert (v.name, v.first_line, v.lines, v.target) == ("b.md", 1, B_LINES, (3, 4))
    assert v.heat == [0, 0, 1.0, 1.0]
    assert v.caption == "source 1 of answer 2 · 25% of the corpus-bound attention · layers 3"
    v = ins.open("src:0:0", 0)  # an earlier answer: its heat is the last answer's whole-answer selection
    assert v.name == "a.py" and v.target == (2, 5) and v.heat[1] == 1.0
    with pytest.raises(InputError, match="nothing to open"):
        ins.open("src:0:3", None)
    with pytest.raises(InputError, match="nothing to open"):
        ins.open("src:-1:0", None)


def test_open_a_heatmap_cell_and_a_position(layout):
    ins = inspector(layout)
    v = ins.open("cell:1:1", None)  # entry 1 = context 4-7 = a.py lines 2-5
    assert (v.name, v.target, v.caption) == ("a.py", (2, 5), "tokens 4–7 · picked by CSA layer 1")
    v = ins.open("cell:1:2", 1)  # token 1 picked entry 2: context 8-11, a.py lines 6-8
    assert (v.name, v.target) == ("a.py", (6, 8))
    assert v.heat[5:8] == [1.0, 1.0, 1.0] and sum(v.heat) == 3.0  # token 1's only pick
    with pytest.raises(InputError, match="holds no selected block"):
        ins.open("cell:3:0", None)
    assert ins.open("pos:0", None).target == (1, 1)
    assert ins.open("pos:14", None).target == (1, 4) and ins.open("pos:14", None).name == "b.md"
    with pytest.raises(InputError, match="not document text"):
        ins.open("pos:20", None)  # the conversation


def test_open_a_file_line(layout):
    ins = inspector(layout)
    v = ins.open("file:b.md:2", None)
    assert (v.name, v.target, v.lines) == ("b.md", (2, 2), B_LINES)
    assert v.heat == [0, 0, 1.0, 1.0]
    with pytest.raises(InputError, match="no document named 'c.txt'"):
        ins.open("file:c.txt:1", None)
    with pytest.raises(InputError, match="no corpus is loaded"):
        V.Inspector().open("file:b.md:2", None)
    assert inspector(layout, prov=None).open("file:a.py:1", None).heat == [0.0] * 8  # no answer yet: no heat
    v = ins.open("file:a.py:2-4", None)  # a range (a never-read region)
    assert v.target == (2, 4) and v.first_line == 1


def test_first_view(layout):
    v = inspector(layout, sources=[[source("b.md", 3, 4)]]).first()
    assert isinstance(v, V.SourceView) and v.name == "b.md" and v.target == (3, 4)
    assert "Ask a question" in inspector(layout).first()
    assert V.Inspector().first() == "Load a corpus to browse its documents here."


# ------------------------------------------------------------------------------------ figures
def test_figures_of_the_whole_answer(layout):
    heat, mass, hca, boundary = inspector(layout).figures()
    h = heat.data[0]
    assert list(h.y) == ["L1", "L3"] and list(h.x) == [0, 4, 8, 12, 16, 20, 24]
    assert h.z[0][1] == pytest.approx(0.5) and np.isnan(h.z[0][0])  # unselected cells are gaps
    assert "tokens 4–7<br>a.py:2-5" in h.text[0][1]  # a cell's hover: file and lines
    assert h.colorbar.title.text.startswith("attention weight")
    assert [t.name for t in mass.data] == ["sliding window", "compressed entries", "sink"]
    assert list(mass.data[1].x) == [0.4, 0.3, 0.7]
    assert [t.name for t in hca.data] == ["L2"] and "HCA" in hca.layout.title.text
    assert {t.name for t in boundary.data} >= {"in sliding window", "compressed (closed entry)"}


def test_figures_of_one_token(layout):
    heat, mass, hca, _ = inspector(layout).figures(focus=1, counts=True)
    assert "answer token #1 &#x27;&lt;b&gt;&#x27;" in heat.layout.title.text  # the token's text, escaped
    assert "times picked" in heat.data[0].colorbar.title.text
    assert np.nansum(np.asarray(heat.data[0].z, dtype=float)) == 1.0  # one pick
    assert "(whole answer)" in mass.layout.title.text and "answer token #1" in hca.layout.title.text
    heat, *_ = inspector(layout).figures(focus=7)  # not a token of this answer: the whole answer
    assert "answer token" not in heat.layout.title.text


def test_figures_of_a_span(layout):
    heat, mass, hca, _ = inspector(layout).figures(focus=(0, 1))
    assert "answer tokens #0–#1 &#x27;53&lt;b&gt;&#x27;" in heat.layout.title.text
    assert hca.layout.title.text.endswith("for answer tokens #0–#1")
    z = np.asarray(heat.data[0].z, dtype=float)
    assert z[0][2] == pytest.approx(1.0) and z[0][1] == pytest.approx(0.7)  # summed over the span's tokens
    whole, *_ = inspector(layout).figures()
    assert not np.array_equal(np.nan_to_num(z), np.nan_to_num(np.asarray(whole.data[0].z, dtype=float)))
    heat, *_ = inspector(layout).figures(focus=(0, 5))  # past the answer's tokens: the whole answer
    assert "answer token" not in heat.layout.title.text


def test_figures_before_any_answer(layout):
    heat, mass, hca, boundary = inspector(layout, prov=None).figures()
    assert "ask a question" in heat.layout.annotations[0].text and not heat.data
    assert not mass.data and not hca.data and boundary.data  # the boundary needs only the context length
    assert "No context yet" in V.Inspector().figures()[3].layout.annotations[0].text


# ------------------------------------------------------------------------------------ across answers
def test_coverage_through_the_inspector(layout):
    from app import analysis as A

    ins = V.Inspector(layout, OFFSET, provenance(), [[], []], SHAPE, N_CONTEXT,
                      summaries=[None, A.summarize(provenance())], questions=["first?", "second?"])
    cov = ins.coverage()
    assert [(d.name, d.read, d.entries) for d in cov.docs] == [("a.py", 2, 3), ("b.md", 1, 2)]
    assert [r.target for r in cov.regions()] == ["file:b.md:1-2", "file:a.py:1"]
    assert ins.open(cov.regions()[0].target, None).target == (1, 2)  # a region opens the viewer at its lines
    fig = ins.coverage_figure(cov)
    assert list(fig.data[0].y) == ["answer 2", "any answer"]  # answer 1 has no record
    assert np.asarray(fig.data[0].z, dtype=float)[0].tolist() == [0, 1, 1, 0, 1, 0]
    assert "No answers yet" in V.Inspector(layout, OFFSET).coverage_figure().layout.annotations[0].text


def test_compare_through_the_inspector(layout):
    from app import analysis as A

    later = provenance()
    later.csa = {1: np.array([0, 0.5, 0, 0.5, 0, 0]), 3: np.array([0, 0, 0, 0, 0.4, 0])}
    later.csa_counts = {1: np.array([0, 1, 0, 1, 0, 0]), 3: np.array([0, 0, 0, 0, 1, 0])}
    ins = V.Inspector(layout, OFFSET, later, [[source("a.py", 2, 5)], [source("a.py", 4, 4)], []], SHAPE, N_CONTEXT,
                      summaries=[A.summarize(provenance()), A.summarize(later), None],
                      questions=["What is  the code?", "And\nthe other?", "failed"])
    assert ins.answer_choices() == [("answer 1: What is the code?", "0"), ("answer 2: And the other?", "1")]
    assert ins.default_pair() == (0, 1)
    assert ins.parse_answer("1") == 1 and ins.parse_answer("2") is None and ins.parse_answer("x") is None
    heat_a, heat_b, diff, overlap = ins.compare_figures(0, 1)
    assert heat_a.data[0].zmax == heat_b.data[0].zmax == pytest.approx(0.5)  # one colour scale
    assert heat_a.layout.title.text.startswith("Answer 1") and heat_b.layout.title.text.startswith("Answer 2")
    d = np.asarray(diff.data[0].z, dtype=float)
    assert d[0].tolist()[1:5] == pytest.approx([0, -0.25, 0.5, -0.1]) and np.isnan(d[0][0])
    assert [t.name for t in overlap.data] == ["answer 1 only", "both", "answer 2 only"]
    assert list(overlap.data[1].x) == [1, 1]
    assert ins.comparison(0, 1).shared == [(0, 0)]
    empty = ins.compare_figures(None, 1)
    assert all(not f.data for f in empty) and "Ask two questions" in empty[0].layout.annotations[0].text
