"""Tests for runtime/figures.py: exact binning, size bounds, doc shapes, hover, empty inputs."""
import json
import sys

import numpy as np
import plotly.graph_objects as go
import pytest

from runtime import figures as F
from runtime.figures import Doc, bin_positions

M = 1 << 20  # 1,048,576 tokens


# -- bin_positions ----------------------------------------------------------

def test_bin_identity_when_under_cap():
    edges, b = bin_positions([1, 0, 2, 5], entry_tokens=4, n_tokens=16, max_columns=10)
    assert edges.tolist() == [0, 4, 8, 12, 16]
    assert b.tolist() == [1, 0, 2, 5]


def test_bin_sum_and_max_exact():
    v = [1, 2, 3, 4, 5, 6, 7]                       # 7 entries of 4 tokens = 28 tokens
    edges, s = bin_positions(v, 4, 28, max_columns=3)  # k = ceil(7/3) = 3 entries per bin
    assert edges.tolist() == [0, 12, 24, 28]
    assert s.tolist() == [6, 15, 7]
    _, m = bin_positions(v, 4, 28, max_columns=3, how="max")
    assert m.tolist() == [3, 6, 7]


def test_bin_partial_last_entry_and_short_input():
    # 10 tokens -> 3 entries (last one partial); only 1 value given -> rest count as 0
    edges, s = bin_positions([2.5], 4, 10, max_columns=2)
    assert edges.tolist() == [0, 8, 10]
    assert s.tolist() == [2.5, 0]
    # max with negative values: padding beyond the context must not win, given-missing entries are 0
    _, m = bin_positions([-1, -2, -3], 4, 10, max_columns=1, how="max")
    assert m.tolist() == [-1]
    _, m = bin_positions([-1], 4, 10, max_columns=1, how="max")
    assert m.tolist() == [0]


def test_bin_preserves_total_and_rejects_out_of_context():
    rng = np.random.default_rng(0)
    v = rng.random(1000)
    _, s = bin_positions(v, 4, 4000, max_columns=7)
    assert s.sum() == pytest.approx(v.sum())
    bin_positions(np.r_[v, 0, 0], 4, 4000, 7)       # trailing zeros beyond context: fine
    with pytest.raises(ValueError):
        bin_positions(np.r_[v, 1.0], 4, 4000, 7)
    with pytest.raises(ValueError):
        bin_positions(v, 4, 4000, 7, how="mean")


def test_bin_column_cap_at_1m_tokens():
    for n in (M, 1_000_000, M - 3, 999_999):
        for entry in (4, 128):
            edges, b = bin_positions(np.ones(-(-n // entry)), entry, n, 2000)
            assert 1 <= b.size <= 2000
            assert edges[0] == 0 and edges[-1] == n and np.all(np.diff(edges) > 0)
            assert b.sum() == -(-n // entry)


def test_bin_empty_context():
    edges, b = bin_positions([], 4, 0, 2000)
    assert edges.tolist() == [0] and b.size == 0


# -- selection_heatmap ------------------------------------------------------

def _selection(n_tokens, layers=(1, 3, 5, 7), k=512, seed=0):
    rng = np.random.default_rng(seed)
    n_entries = n_tokens // 4
    out = {}
    for l in layers:
        a = np.zeros(n_entries)
        a[rng.choice(n_entries, size=k * 8, replace=False)] = rng.integers(1, 9, size=k * 8)
        out[l] = a
    return out


def test_heatmap_1m_tokens_columns_and_json_size():
    docs = [Doc(f"file{i}.py", i * (M // 40), (i + 1) * (M // 40)) for i in range(40)]
    fig = F.selection_heatmap(_selection(M), M, docs, max_columns=2000,
                              locate=lambda a, b: f"src/file{a // (M // 40)}.py:{a % 997 + 1}-{b % 997 + 1}")
    hm = fig.data[0]
    assert isinstance(hm, go.Heatmap)
    z = np.asarray(hm.z)
    assert z.shape[0] == 4 and z.shape[1] <= 2000
    assert len(hm.x) == z.shape[1] + 1                # x are bin edges
    assert "sum" in hm.colorbar.title.text
    size = len(fig.to_json())
    assert size < 2_000_000, size


def test_heatmap_hover_has_locate_and_only_nonzero_cells():
    n = 4096
    sel = {2: np.zeros(n // 4)}
    sel[2][10] = 3                                    # tokens 40..43
    fig = F.selection_heatmap(sel, n, [("notes.md", 0, n)], max_columns=100,
                              locate=lambda a, b: f"notes.md:{a // 16 + 1}")
    text = fig.data[0].text
    filled = [t for row in text for t in row if t]
    assert len(filled) == 1
    assert "notes.md:" in filled[0] and "tokens 0–" in filled[0]
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.isnan(z).sum() == z.size - 1 and np.nansum(z) == 3


def test_heatmap_without_locate_names_docs():
    n = 1024
    sel = {0: np.zeros(n // 4)}
    sel[0][200] = 1                                   # token 800 -> in b.txt
    fig = F.selection_heatmap(sel, n, [("a.txt", 0, 512), ("b.txt", 512, n)], max_columns=1000)
    assert any("b.txt" in t for row in fig.data[0].text for t in row)


def test_heatmap_max_mode_in_colorbar():
    fig = F.selection_heatmap(_selection(4096, k=4), 4096, [], how="max", max_columns=50)
    assert "max" in fig.data[0].colorbar.title.text


def test_few_docs_get_named_boundary_lines():
    n = 8192
    docs = [("a.py", 0, 3000), ("b.md", 3000, 5000), ("c.txt", 5000, n)]
    fig = F.selection_heatmap(_selection(n, k=8), n, docs)
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert sorted(s.x0 for s in lines) == [0, 3000, 5000]
    names = {a.text for a in fig.layout.annotations}
    assert {"a.py", "b.md", "c.txt"} <= names


def test_many_docs_get_alternating_bands():
    n = 100 * 400
    docs = [(f"d{i}", i * 400, (i + 1) * 400) for i in range(100)]
    fig = F.selection_heatmap(_selection(n, k=8), n, docs)
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(rects) == 50 and rects[0].x0 == 400 and rects[0].x1 == 800
    assert not fig.layout.annotations                 # no per-doc labels


def test_hca_weights_bins_and_docs():
    n = M
    hca = {0: np.full(n // 128, 1 / (n // 128)), 4: np.linspace(0, 1, n // 128)}
    fig = F.hca_weights(hca, n, [("a", 0, n // 2), ("b", n // 2, n)], max_columns=2000)
    assert len(fig.data) == 2
    assert len(fig.data[0].x) <= 2001
    assert sum(fig.data[0].y[:-1]) == pytest.approx(1.0)
    assert any(s.type == "line" and s.x0 == n // 2 for s in fig.layout.shapes)
    assert len(fig.to_json()) < 500_000


def test_mass_split_bar():
    fig = F.mass_split_bar({3: (0.5, 0.4, 0.1), 1: (0.2, 0.7, 0.1)})
    assert [t.name for t in fig.data] == ["sliding window", "compressed entries", "sink"]
    assert list(fig.data[0].y) == ["L1", "L3"]
    assert list(fig.data[1].x) == [0.7, 0.4]
    assert fig.layout.barmode == "stack"
    with pytest.raises(ValueError):
        F.mass_split_bar({0: (0.5, 0.5)})


def test_compression_boundary_segments():
    n, window = 1000, 128
    fig = F.compression_boundary(n, window=window, ratios={0: 0, 1: 4, 2: 128, 3: 4})
    by = {t.name: t for t in fig.data}
    buf = by["buffered (not yet pooled)"]
    spans = {y: (b, b + x) for y, b, x in zip(buf.y, buf.base, buf.x)}
    assert spans["HCA 128:1 (1 layer)"] == (896, 1000)   # 1000 // 128 * 128 = 896
    assert "CSA 4:1 (2 layers)" not in spans             # 1000 % 4 == 0: nothing buffered
    win = by["in sliding window"]
    assert (win.base[0], win.base[0] + win.x[0]) == (n - window, n)
    comp = by["compressed (closed entry)"]
    csa = [(b, b + x) for y, b, x in zip(comp.y, comp.base, comp.x) if y.startswith("CSA")]
    assert csa[0] == (488, 492) and csa[-1] == (996, 1000) and len(csa) == 128
    hca = [(b, b + x) for y, b, x in zip(comp.y, comp.base, comp.x) if y.startswith("HCA")]
    assert hca == [(488, 512), (512, 640), (640, 768), (768, 896)]   # clipped to the view
    assert list(fig.layout.yaxis.categoryarray)[0].startswith("sliding window")


def test_compression_boundary_short_context_buffer():
    fig = F.compression_boundary(6, ratios={0: 4})
    buf = [t for t in fig.data if t.name.startswith("buffered")][0]
    assert (buf.base[0], buf.x[0]) == (4, 2)
    assert "not yet pooled" in buf.hovertext[0]


def test_cache_ledger():
    fig = F.cache_ledger({"SWA ring": 3 << 20, "CSA KV": 40 << 20, "indexer keys": 10 << 20}, 2 << 30)
    assert [t.name for t in fig.data][-1] == "dense equivalent"
    assert fig.data[1].text[0] == "40.0 MiB"
    note = fig.layout.annotations[0].text
    assert "53.0 MiB" in note and "of dense" in note
    with pytest.raises(ValueError):
        F.cache_ledger({"x": -1}, 10)


def test_cache_ledger_axis_reads_binary_units():
    """The axis is in one binary unit chosen from the longer bar, never plotly's SI "0.5B / 1B"."""
    fig = F.cache_ledger({"CSA KV": 384 << 20, "HCA": 128 << 20}, 3 << 30)  # 0.5 GiB of cache, 3 GiB dense
    ax = fig.layout.xaxis
    assert ax.ticksuffix == " GiB" and ax.exponentformat == "none" and "GiB" in ax.title.text
    assert [t.x[0] for t in fig.data] == [0.375, 0.125, 3.0]  # the data in GiB
    assert fig.data[0].text[0] == "384.0 MiB" and "402,653,184 B" in fig.data[0].hovertemplate  # exact bytes
    small = F.cache_ledger({"window": 3 << 10}, 12 << 10)
    assert small.layout.xaxis.ticksuffix == " KiB" and [t.x[0] for t in small.data] == [3.0, 12.0]
    tiny = F.cache_ledger({"window": 100}, 900)
    assert tiny.layout.xaxis.ticksuffix == " B" and [t.x[0] for t in tiny.data] == [100, 900]


def test_byte_unit():
    assert F.byte_unit(0) == ("B", 1)
    assert F.byte_unit(1023) == ("B", 1)
    assert F.byte_unit(1024) == ("KiB", 1024)
    assert F.byte_unit(5 << 20) == ("MiB", 1 << 20)
    assert F.byte_unit((1 << 30) - 1) == ("MiB", 1 << 20)
    assert F.byte_unit(3 << 30) == ("GiB", 1 << 30)
    assert F.byte_unit(1 << 60) == ("TiB", 1 << 40)  # the largest unit, whatever the size


def test_format_bytes():
    assert F.format_bytes(0) == "0 B"
    assert F.format_bytes(1023) == "1023 B"
    assert F.format_bytes(1536) == "1.5 KiB"
    assert F.format_bytes(3 << 30) == "3.0 GiB"


@pytest.mark.parametrize("make", [
    lambda: F.selection_heatmap({}, 1000, []),
    lambda: F.selection_heatmap({0: np.zeros(10)}, 0, []),
    lambda: F.mass_split_bar({}),
    lambda: F.hca_weights({}, 0, []),
    lambda: F.compression_boundary(0, ratios={0: 4}),
    lambda: F.compression_boundary(100, ratios={}),
    lambda: F.cache_ledger({}, 0),
    lambda: F.difference_heatmap({}, {}, 100),
    lambda: F.difference_heatmap({0: np.ones(4)}, {}, 0),
    lambda: F.overlap_bars({}),
    lambda: F.coverage_strip([], 100),
    lambda: F.coverage_strip([("a", np.ones(4))], 0),
])
def test_empty_inputs_give_annotated_figure(make):
    fig = make()
    assert isinstance(fig, go.Figure) and not fig.data
    assert fig.layout.annotations and fig.layout.annotations[0].text
    json.loads(fig.to_json())


def test_all_zero_selection_renders():
    fig = F.selection_heatmap({0: np.zeros(250)}, 1000, [("a", 0, 1000)])
    assert all(t == "" for row in fig.data[0].text for t in row)


# -- comparing and covering --------------------------------------------------

def test_shared_colour_scale():
    a, b = {1: np.array([0, 2.0, 0, 1.0])}, {1: np.array([0.5, 0, 0, 0]), 3: np.array([0, 0, 3.0, 0])}
    assert F.shared_zmax([a, b], 16, ratio=4) == 3.0
    assert F.shared_zmax([a, b], 16, ratio=4, max_columns=2) == 3.0  # bins of two entries: (0.5, 0), (0, 3)
    assert F.shared_zmax([a], 16, ratio=4, max_columns=1) == 3.0 and F.shared_zmax([{}], 16) == 0.0
    h = F.selection_heatmap(a, 16, ratio=4, zmax=3.0, title="Answer 1").data[0]
    assert (h.zmin, h.zmax) == (0.0, 3.0)
    assert F.selection_heatmap(a, 16, ratio=4, title="Answer 1").layout.title.text == "Answer 1"
    assert F.selection_heatmap(a, 16, ratio=4).data[0].zmax is None  # by default: its own scale
    assert "nothing here" in F.selection_heatmap({}, 0, empty="nothing here").layout.annotations[0].text


def test_difference_heatmap():
    a = {1: np.array([0, 2.0, 0, 1.0])}
    b = {1: np.array([0, 0.5, 0, 1.0]), 3: np.array([0, 0, 3.0, 0])}
    fig = F.difference_heatmap(a, b, 16, [("x.py", 0, 16)], ratio=4, labels=("answer 1", "answer 2"))
    h = fig.data[0]
    assert list(h.y) == ["L1", "L3"] and list(h.x) == [0, 4, 8, 12, 16]
    z = np.asarray(h.z, dtype=float)
    assert z[0][1] == -1.5 and z[0][3] == 0.0 and np.isnan(z[0][0]) and np.isnan(z[0][2])  # blank: neither picked
    assert z[1][2] == 3.0 and np.isnan(z[1][0])  # layer 3 is b's only: a counts as 0
    assert (h.zmin, h.zmax, h.zmid) == (-3.0, 3.0, 0.0)  # symmetric around 0
    assert np.asarray(h.customdata)[0][1].tolist() == [2.0, 0.5]  # both values, for the hover
    assert h.text[0][1].startswith("tokens 4–7") and h.text[0][0] == ""
    assert "answer 2 − answer 1" in fig.layout.title.text and "answer 1: %{customdata[0]" in h.hovertemplate
    same = F.difference_heatmap(a, a, 16, ratio=4).data[0]
    assert (same.zmin, same.zmax) == (-1.0, 1.0)  # no difference anywhere: a unit scale, not a zero one


def test_overlap_bars():
    fig = F.overlap_bars({3: (2, 1, 1), 1: (0, 4, 0)}, labels=("answer 1", "answer 2"), jaccard={1: 1.0, 3: 0.25})
    assert [t.name for t in fig.data] == ["answer 1 only", "both", "answer 2 only"]
    assert list(fig.data[0].y) == ["L1", "L3"] and list(fig.data[0].x) == [0, 2] and list(fig.data[1].x) == [4, 1]
    assert [a.text for a in fig.layout.annotations] == ["Jaccard 1.00", "Jaccard 0.25"]
    assert fig.layout.annotations[1].x == 4  # at the end of L3's bar
    assert F.overlap_bars({1: (0, 0, 0)}, jaccard={1: float("nan")}).layout.annotations[0].text == "Jaccard –"
    with pytest.raises(ValueError):
        F.overlap_bars({1: (1, 2)})


def test_coverage_strip():
    read = np.array([1, 0, 1, 1, 0], bool)  # 5 closed entries of a 22-token context (tokens 20-21: open)
    fig = F.coverage_strip([("answer 1", read), ("any answer", np.ones(5, bool))], 22, [("a", 0, 22)], ratio=4)
    h = fig.data[0]
    assert list(h.y) == ["answer 1", "any answer"] and list(h.x) == [0, 4, 8, 12, 16, 20, 22]
    z = np.asarray(h.z, dtype=float)
    assert z[0][:5].tolist() == [1, 0, 1, 1, 0] and np.isnan(z[0][5])  # the open tokens: no entry yet
    assert (h.zmin, h.zmax) == (0.0, 1.0) and h.text[0][1].startswith("tokens 4–7")
    binned = np.asarray(F.coverage_strip([("r", read)], 22, ratio=4, max_columns=2).data[0].z, dtype=float)
    assert binned[0].tolist() == [pytest.approx(2 / 3), 0.5]  # entries 0-2: two of three read; 3-4: one of two


def test_module_is_pure():
    import ast, inspect
    tree = ast.parse(inspect.getsource(F))
    mods = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    mods |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert mods - {"plotly", "numpy", "__future__"} <= set(sys.stdlib_module_names)
