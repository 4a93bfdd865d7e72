"""The view-models of the inspector's Counterfactual, Needles and Export tabs (app/views.py): pure, on fakes."""

from types import SimpleNamespace as NS

import numpy as np
import pytest

from app import inspector_view as V
from app import views as W
from app.errors import InputError


def test_parse_specs_lines_and_tokens():
    assert W.parse_specs("") == []
    assert W.parse_specs("a.md, b.py:3 ,c.txt:4-9") == ["a.md", "b.py:3", "c.txt:4-9"]
    assert W.parse_specs("tokens:100-103, tokens:7") == [(100, 104), (7, 8)]
    with pytest.raises(InputError, match="after the last"):
        W.parse_specs("tokens:9-3")
    assert W.add_spec("a.md", "b.md:2") == "a.md, b.md:2" and W.add_spec("a.md, b.md:2", "b.md:2") == "a.md, b.md:2"


def test_parse_topk():
    assert W.parse_topk(None) is None and W.parse_topk("") is None and W.parse_topk(0) is None
    assert W.parse_topk(8) == 8 and W.parse_topk("16") == 16
    with pytest.raises(InputError):
        W.parse_topk("many")
    with pytest.raises(InputError):
        W.parse_topk(-2)


def test_target_spec_from_viewer_targets():
    src = NS(file="log.md", line_start=22, line_end=22, weight=0.5, layers=[1])
    prov = NS(rates={1: 4}, n_context=64, csa={1: np.eye(16)[5]}, csa_counts={1: np.eye(16)[5]},
              tokens=[NS(index=0, text="x", entries={})], selection=lambda tokens, counts: ({1: np.eye(16)[5]}, {}))
    model = V.Inspector(provenance=prov, sources=[[src]])
    assert W.target_spec(model, "src:0:0") == "log.md:22"
    assert W.target_spec(model, "file:notes.txt:3-9") == "notes.txt:3-9"
    assert W.target_spec(model, "file:notes.txt:3") == "notes.txt:3"
    assert W.target_spec(model, "pos:21") == "tokens:20-23"
    col = next(c for c in range(64) if (V.cell_entries(4, 64, c) or (0, 0))[0] <= 5 < (V.cell_entries(4, 64, c) or (0, 0))[1])
    assert W.target_spec(model, f"cell:1:{col}") == "tokens:20-23"
    with pytest.raises(InputError, match="click a heatmap cell"):
        W.target_spec(model, "")
    with pytest.raises(InputError):
        W.target_spec(model, "src:3:0")


def _cf(changed=True):
    diff = NS(kept=10, dropped=np.array([5]), added=np.array([9, 10]), dropped_weight=0.25, added_weight=0.125,
              where=lambda which, describe, top: [("log.md:22-22", 0.25)] if which == "dropped" else [])
    return NS(question="What is the code?", steering=NS(exclude=[(20, 24)], include=[], index_topk=None),
              old=NS(text="5820417", stop_reason="eos", provenance=None),
              new=NS(text="3319024", stop_reason="eos", provenance=None), changed=changed,
              selection={1: diff}, mass={1: NS(before=(0.5, 0.4, 0.1), after=(0.6, 0.3, 0.1))},
              spans=[NS(kind="exclude", token_start=20, token_end=24, where="log.md:22-22", csa_before={1: 0.25},
                        csa_after={1: 0.0}, hca_before={}, hca_after={})], describe=lambda a, b: "")


def test_counterfactual_html_shows_both_answers_and_what_moved():
    html = W.counterfactual_html(_cf(), "SCOPE")
    assert "5820417" in html and "3319024" in html and "the answer changed" in html and "SCOPE" in html
    assert "log.md:22-22 (25.0%)" in html and "excluded 1 span" in html
    assert "40.0% → 30.0%" in html  # compressed mass before -> after
    assert "the answer is the same" in W.counterfactual_html(_cf(False), "S")
    assert "SCOPE" in W.counterfactual_html(None, "SCOPE")
    assert W.steering_text(NS(exclude=[], include=[], index_topk=8)) == "index_topk 8"


def test_counterfactual_figures_without_provenance_are_empty():
    figs = W.counterfactual_figures(None, V.Inspector())
    assert len(figs) == 3


def test_needle_html_grid():
    def cell(ok, doc, line, depth):
        n = NS(document=doc, line=line, depth=depth, sentence="The code for the owl is 123.", value="123",
               question="What is the code for the owl?")
        return NS(needle=n, ok=ok, selected=ok, in_window=False, rank=1 if ok else None, miss=None if ok else "wrong",
                  output="123" if ok else "9")
    grid = NS(depths=[0.0, 1.0], rows=lambda: [("a.md", [cell(True, "a.md", 1, 0.0), cell(False, "a.md", 9, 1.0)])],
              summary=lambda: ["Found 1 of 2."])
    html = W.needle_html(grid)
    assert html.count("ll-needle-ok") == 1 and html.count("ll-needle-miss") == 1
    assert "depth 0</th>" in html and "Found 1 of 2." in html and 'data-ll-open="file:a.md:8"' in html
    assert "placeholder" in W.needle_html(None)
    assert W.parse_depths(["1", "0", "0.5"]) == [0.0, 0.5, 1.0]
    with pytest.raises(InputError):
        W.parse_depths([])
