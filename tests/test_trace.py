"""Traces and reports (runtime/trace.py, runtime/report.py, `ask --report/--trace`, `trace show`): a Longlens
trace round-trips exactly and shows the live answer's cells; an SGLang-layout selection built here by hand
(int32 [rows, CSA layers, top-k], -1 padding, base64 in meta_info.indexer_topk) loads and shows the same
cells as times picked; malformed traces fail with clear errors; the HTML report is self-contained, opens in
Chromium with every network request blocked and draws the heatmap; figures export as PNG and SVG."""

import base64
import copy
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import drain, write_corpus

from runtime import Engine, GenerationParams
from runtime.__main__ import main
from runtime.corpus import Layout, ingest
from runtime.report import read_report, report_figures, write_figures, write_report
from runtime.snapshot import corpus_fingerprint
from runtime.trace import FORMAT, Trace, TraceError, from_sglang, read_trace, to_sglang

QUESTION = "What is the secret launch code?"


@pytest.fixture(scope="module")
def live(tiny_model_dir, corpus_paths):
    """(engine, session, answer) of one short answer on the random tiny model."""
    engine = Engine.from_dir(tiny_model_dir, chunk_size=256)
    session = engine.new_session()
    session.load_corpus(corpus_paths)
    _, answer = drain(session.ask(QUESTION, GenerationParams(max_new_tokens=5)))
    assert answer.provenance is not None and len(answer.token_ids) == 5
    return engine, session, answer


@pytest.fixture(scope="module")
def trace(live):
    _, session, answer = live
    return Trace.from_answer(answer, QUESTION, session)


def same_selection(a, b, counts: bool, tokens=None):
    csa_a, hca_a = a.selection(tokens, counts)
    csa_b, hca_b = b.selection(tokens, counts)
    assert sorted(csa_a) == sorted(csa_b) and sorted(hca_a) == sorted(hca_b)
    for l in csa_a:
        np.testing.assert_array_equal(csa_a[l], csa_b[l])
    for l in hca_a:
        np.testing.assert_array_equal(hca_a[l], hca_b[l])


def heat_z(prov, counts):
    return np.asarray(report_figures(prov, counts=counts)["csa-selection"].data[0].z, dtype=np.float64)


# ------------------------------------------------------------------------------------ Longlens JSON
def test_longlens_trace_round_trips_and_shows_the_same_cells(live, trace):
    engine, session, answer = live
    prov = answer.provenance
    text = trace.to_json()
    obj = json.loads(text)
    assert obj["format"] == FORMAT and obj["origin"] == "longlens" and obj["question"] == QUESTION
    assert obj["corpus"]["fingerprint"] and obj["model"]["fingerprint"] and obj["model"]["index_topk"] == 512
    back = Trace.from_json(text)
    assert back == trace and back.to_json() == text and back.weighted
    assert back.csa_layers == [1, 3] and back.hca_layers == [2] and back.selected.shape[:2] == (5, 2)
    shown = back.to_provenance(session.layout, session.offset, engine.config)
    for counts in (False, True):
        same_selection(shown, prov, counts)
        for k in range(len(prov.tokens)):
            same_selection(shown, prov, counts, [k])
        np.testing.assert_array_equal(heat_z(shown, counts), heat_z(prov, counts))
    assert shown.mass == prov.mass and shown.docs == prov.docs and shown.n_context == prov.n_context
    assert shown.sources == prov.sources and [t.sources for t in shown.tokens] == [t.sources for t in prov.tokens]
    assert [(t.position, t.token_id, t.text) for t in shown.tokens] == [(t.position, t.token_id, t.text)
                                                                         for t in prov.tokens]


def test_shown_over_another_corpus_or_model_is_refused(live, trace, tmp_path):
    engine, session, _ = live
    edited = ingest(write_corpus(tmp_path / "other", lines=30))  # the same files, each grown by six lines
    edited.documents[:] = [dataclasses.replace(d, name=t[0]) for d, t in zip(edited.documents, trace.documents)]
    other = Layout.build(edited, engine.tokenizer.encode_with_offsets)
    with pytest.raises(TraceError, match="another version of the corpus"):
        trace.to_provenance(other)
    with pytest.raises(TraceError, match="made over another corpus: its documents are .*a.txt"):
        trace.to_provenance(Layout.build(ingest(write_corpus(tmp_path / "x")[:1]), engine.tokenizer.encode_with_offsets))
    with pytest.raises(TraceError, match="chat preamble"):
        trace.to_provenance(session.layout, offset=session.offset + 1)
    cfg = copy.copy(engine.config)
    cfg.layer_types = [cfg.layer_types[0], cfg.layer_types[2], cfg.layer_types[1], cfg.layer_types[3]]
    with pytest.raises(TraceError, match="another model"):
        trace.to_provenance(session.layout, config=cfg)
    assert trace.mismatches(corpus=corpus_fingerprint(other, engine.preamble)) == [
        "the trace was made with another corpus"]
    assert trace.mismatches(corpus=session.fingerprints().corpus) == []


# ------------------------------------------------------------------------------------ SGLang layout
def sglang_response(live, shuffle_seed=0):
    """What SGLang's /generate returns with return_indexer_topk: every position's row from 0 (the prompt's
    rows first), the answer's rows holding the live selection in a shuffled order, -1 padded to index_topk."""
    engine, session, answer = live
    prov = answer.provenance
    csa_layers = [1, 3]
    K = engine.config.index_topk
    P = prov.tokens[0].position + 1  # prompt tokens: the first answer token came from the query at P - 1
    T = len(prov.tokens)
    rows = np.full((P + T - 1, len(csa_layers), K), -1, np.int32)
    rows[:P - 1, :, 0] = 0  # the prompt's own picks: present in a real response, not the answer's
    rng = np.random.default_rng(shuffle_seed)
    for k, tok in enumerate(prov.tokens):
        for j, l in enumerate(csa_layers):
            ids = rng.permutation(tok.entries[l][0])
            rows[P - 1 + k, j, :len(ids)] = ids
    b64 = base64.b64encode(rows.astype("<i4").tobytes()).decode()
    return {"text": answer.text, "output_ids": list(answer.token_ids),
            "meta_info": {"indexer_topk": b64, "prompt_tokens": P, "completion_tokens": T}}


def test_sglang_trace_loads_and_shows_the_same_cells(live):
    engine, session, answer = live
    prov = answer.provenance
    obj = sglang_response(live)
    loaded = from_sglang(json.dumps(obj), engine.config, documents=session.docs(), offset=session.offset,
                         n_context=prov.n_context, question=QUESTION, tokenizer=engine.tokenizer)
    assert loaded.origin == "sglang" and not loaded.weighted and loaded.answer == answer.text
    assert loaded.query_positions == [t.position for t in prov.tokens]
    assert loaded.pieces == [t.text for t in prov.tokens]
    shown = loaded.to_provenance(session.layout, session.offset, engine.config)
    csa, _ = shown.selection(None, counts=True)
    live_csa, _ = prov.selection(None, counts=True)
    assert sorted(csa) == sorted(live_csa) == [1, 3]
    for l in csa:
        np.testing.assert_array_equal(csa[l], live_csa[l])
        np.testing.assert_array_equal(shown.selection(None, counts=False)[0][l], live_csa[l])  # values are counts
        for k in range(len(prov.tokens)):
            np.testing.assert_array_equal(shown.selection([k], True)[0][l], prov.selection([k], True)[0][l])
    np.testing.assert_array_equal(heat_z(shown, True), heat_z(prov, True))
    assert shown.hca == {} and shown.mass == {}
    assert shown.sources and {s.file for s in shown.sources} <= {d[0] for d in prov.docs}
    fig = report_figures(shown, counts=True)["csa-selection"]
    assert "times picked" in fig.data[0].colorbar.title.text

    # without n_context: the context ends at the last answer query; the picked cells are the same
    short = from_sglang(obj, engine.config, documents=session.docs(), offset=session.offset).to_provenance(session.layout)
    for l in csa:
        got = short.selection(None, True)[0][l]
        np.testing.assert_array_equal(got, live_csa[l][:len(got)])
        assert not live_csa[l][len(got):].any()

    # a Longlens JSON trace of it round-trips, and our SGLang export reads back the same
    assert Trace.from_json(loaded.to_json()) == loaded
    out = to_sglang(Trace.from_answer(answer, QUESTION, session))
    assert out["meta_info"]["indexer_topk_shape"] == [5, 2, 512]
    assert len(base64.b64decode(out["meta_info"]["indexer_topk"])) == 5 * 2 * 512 * 4
    again = from_sglang(out, engine.config, documents=session.docs(), offset=session.offset, n_context=prov.n_context)
    for l in csa:
        np.testing.assert_array_equal(again.to_provenance(session.layout).selection(None, True)[0][l], live_csa[l])


def test_sglang_known_sparse_selection_gives_its_cells(live):
    """A hand-made selection of a few entries per token and layer: the cells are exactly its pick counts."""
    engine, session, answer = live
    P, T, K = answer.provenance.tokens[0].position + 1, 4, engine.config.index_topk
    rng = np.random.default_rng(7)
    rows = np.full((T, 2, K), -1, np.int32)
    expected = {1: np.zeros((P - 1 + T) // 4), 3: np.zeros((P - 1 + T) // 4)}
    for k in range(T):
        visible = (P + k) // 4  # entries closed before the query at P - 1 + k
        for j, l in enumerate((1, 3)):
            ids = rng.choice(min(visible, 60), size=6, replace=False)  # the corpus' first files only
            rows[k, j, :6] = ids
            expected[l][ids] += 1
    obj = {"meta_info": {"indexer_topk": base64.b64encode(rows.tobytes()).decode(), "prompt_tokens": P,
                         "completion_tokens": T, "indexer_topk_start_len": P - 1}}
    shown = from_sglang(obj, engine.config, documents=session.docs(), offset=session.offset).to_provenance(session.layout)
    csa, _ = shown.selection(None, counts=True)
    for l in (1, 3):
        np.testing.assert_array_equal(csa[l], expected[l])
    z = np.nan_to_num(heat_z(shown, True))
    want = np.vstack([expected[1], expected[3]])
    # the figure may show one more (partly filled, never picked) entry column past the last query's closed ones
    assert want.shape[1] <= z.shape[1] <= want.shape[1] + 1 and not z[:, want.shape[1]:].any()
    np.testing.assert_array_equal(z[:, : want.shape[1]], want)
    assert [t.token_id for t in shown.tokens] == [-1] * T and shown.sources


# ------------------------------------------------------------------------------------ malformed input
def _set_first_id(o, value):
    a = o["csa"]["selected"]
    ids = np.frombuffer(base64.b64decode(a["base64"]), "<i4").copy()
    ids[0] = value
    a["base64"] = base64.b64encode(ids.tobytes()).decode()


def _mutated(trace, change):
    o = trace.to_dict()
    change(o)
    return json.dumps(o)


@pytest.mark.parametrize("case, change, message", [
    ("no format", lambda o: o.pop("format"), "no 'format' field"),
    ("other format", lambda o: o.update(format="longlens-trace/9"), "unsupported trace format 'longlens-trace/9'"),
    ("missing field", lambda o: o["answer"].pop("token_ids"), "'answer.token_ids' is missing"),
    ("wrong type", lambda o: o.update(n_context="many"), "'n_context': expected int"),
    ("bad base64", lambda o: o["csa"]["selected"].update(base64="**not base64**"), "csa.selected: not valid base64"),
    ("short data", lambda o: o["csa"]["selected"].update(shape=[5, 2, 999]), "bytes of data for shape"),
    ("wrong dtype", lambda o: o["csa"]["weights"].update(dtype="int32"), "dtype must be float32"),
    ("id too large", lambda o: _set_first_id(o, 10 ** 6), "entry id 1000000 is outside the"),
    ("query outside", lambda o: o.update(n_context=8), "query positions must lie in the 8-token context"),
    ("layer key", lambda o: o["mass"].update(x=[0, 0, 0]), "key 'x' is not a layer number"),
    ("bad source", lambda o: o["sources"][0].pop("file"), "sources[0]': missing file"),
    ("too few ids", lambda o: o["answer"].update(token_ids=[1]), "5 query positions but 1 answer token ids"),
])
def test_malformed_longlens_traces_say_what_is_wrong(trace, case, change, message):
    with pytest.raises(TraceError) as e:
        Trace.from_json(_mutated(trace, change))
    assert message in str(e.value), str(e.value)


def test_malformed_inputs_in_general(live, trace, tmp_path):
    engine, session, _ = live
    with pytest.raises(TraceError, match="must be JSON"):
        Trace.from_json("{not json")
    with pytest.raises(TraceError, match="JSON object, got list"):
        Trace.from_json("[1, 2]")
    with pytest.raises(TraceError, match="an SGLang response"):
        Trace.from_json(json.dumps(sglang_response(live)))
    kw = dict(documents=session.docs(), offset=session.offset)
    obj = sglang_response(live)
    with pytest.raises(TraceError, match="return_indexer_topk"):
        from_sglang({"text": "x", "meta_info": {}}, engine.config, **kw)
    with pytest.raises(TraceError, match="batch of 2"):
        from_sglang([obj, obj], engine.config, **kw)
    bad = copy.deepcopy(obj)
    bad["meta_info"]["indexer_topk"] = base64.b64encode(b"\x00" * 4 * 1001).decode()
    with pytest.raises(TraceError, match="not \\[rows x 2 CSA layers x 512 top-k\\]"):
        from_sglang(bad, engine.config, **kw)
    bad["meta_info"]["indexer_topk"] = "%%%"
    with pytest.raises(TraceError, match="not valid base64"):
        from_sglang(bad, engine.config, **kw)
    short = copy.deepcopy(obj)
    short["meta_info"]["prompt_tokens"] += 50
    with pytest.raises(TraceError, match="rows"):
        from_sglang(short, engine.config, **kw)
    far = copy.deepcopy(obj)
    rows = np.frombuffer(base64.b64decode(far["meta_info"]["indexer_topk"]), "<i4").copy()
    rows[-1] = 10 ** 6
    far["meta_info"]["indexer_topk"] = base64.b64encode(rows.tobytes()).decode()
    with pytest.raises(TraceError, match="does not belong to this prompt"):
        from_sglang(far, engine.config, **kw)
    with pytest.raises(TraceError, match="pass the model's config"):
        from_sglang(obj, **kw)
    (tmp_path / "page.html").write_text("<!doctype html><p>hello</p>")
    with pytest.raises(TraceError, match="no Longlens trace"):
        read_trace(tmp_path / "page.html")


# ------------------------------------------------------------------------------------ the report
def test_report_is_self_contained_and_holds_the_trace(live, trace, tmp_path):
    _, session, answer = live
    path = write_report(tmp_path / "answer.html", trace, session.layout)
    html = path.read_text()
    assert not re.search(r"""<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=""", html, re.I)
    assert not re.search(r"""url\(\s*['"]?https?:""", html, re.I) and "@import" not in html
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert html.count("Plotly.newPlot(") == 3 and html.count('data-export="svg"') == 3
    assert QUESTION in html and answer.provenance.sources[0].file in html
    s = answer.provenance.sources[0]
    assert f"{s.file}:{s.line_start}-{s.line_end}" in html
    assert read_report(path) == trace == read_trace(path)


@pytest.mark.browser
def test_report_opens_offline_in_chromium_and_draws_the_heatmap(live, trace, tmp_path, browser):
    _, session, _ = live
    path = write_report(tmp_path / "answer.html", trace, session.layout)
    context = browser.new_context(offline=True)
    asked = []

    def block(route):
        url = route.request.url
        if url.startswith(("file:", "data:", "blob:")):
            route.continue_()
        else:
            asked.append(url)
            route.abort()
    context.route("**/*", block)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector("#fig-csa-selection .main-svg", timeout=30000)
    drawn = page.evaluate("""() => {
        const gd = document.getElementById('fig-csa-selection');
        return {type: gd._fullData[0].type, cells: gd.querySelectorAll('.heatmaplayer image, .hm image').length,
                svgs: document.querySelectorAll('.js-plotly-plot .main-svg').length,
                format: JSON.parse(document.getElementById('longlens-trace').textContent).format}; }""")
    assert drawn["type"] == "heatmap" and drawn["cells"] >= 1 and drawn["svgs"] >= 3 and drawn["format"] == FORMAT
    svg = page.evaluate("() => Plotly.toImage(document.getElementById('fig-csa-selection'), {format: 'svg'})")
    assert svg.startswith("data:image/svg+xml")
    assert asked == [] and errors == []
    context.close()


@pytest.mark.browser
def test_figures_export_as_png_and_svg(live, tmp_path):
    _, _, answer = live
    paths = write_figures(tmp_path / "figs", report_figures(answer.provenance))
    assert sorted(p.name for p in paths) == sorted(f"{n}.{x}" for n in ("csa-selection", "mass-split", "hca-weights")
                                                   for x in ("png", "svg"))
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG") if p.suffix == ".png" else b"<svg" in data[:200]


# ------------------------------------------------------------------------------------ command line
def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_report_and_trace_and_shows_them(capsys, tiny_model_dir, tmp_path):
    docs = write_corpus(tmp_path / "docs")
    base = ["--corpus", tmp_path / "docs", "--model", tiny_model_dir]
    code, out, err = run_cli(capsys, "ask", *base, "--question", QUESTION, "--max-new-tokens", "3",
                             "--report", tmp_path / "a.html", "--trace", tmp_path / "a.json", "--json")
    assert code == 0, out + err
    o = json.loads(out)
    assert o["report"] == str(tmp_path / "a.html") and o["trace"] == str(tmp_path / "a.json")
    saved = read_trace(tmp_path / "a.json")
    assert saved.question == QUESTION and saved.answer == o["answer"] and read_report(tmp_path / "a.html") == saved

    code, out, err = run_cli(capsys, "ask", *base, "--question", QUESTION, "--max-new-tokens", "3",
                             "--trace", tmp_path / "s.json", "--trace-format", "sglang", "--json")
    assert code == 0, out + err
    assert "indexer_topk" in json.loads((tmp_path / "s.json").read_text())["meta_info"]

    code, out, err = run_cli(capsys, "trace", "show", tmp_path / "a.json", *base, "--report", tmp_path / "b.html",
                             "--json")
    assert code == 0, out + err
    o = json.loads(out)
    assert o["origin"] == "longlens" and o["measure"] == "attention weight" and o["sources"]
    assert read_report(tmp_path / "b.html") == saved

    code, out, err = run_cli(capsys, "trace", "show", tmp_path / "s.json", *base, "--question", QUESTION,
                             "--report", tmp_path / "c.html", "--trace", tmp_path / "c.json", "--json")
    assert code == 0, out + err
    o = json.loads(out)
    assert o["origin"] == "sglang" and o["measure"] == "times picked" and o["answer_tokens"] == 3
    back = read_trace(tmp_path / "c.json")
    np.testing.assert_array_equal(back.selected[back.selected >= 0], saved.selected[saved.selected >= 0])

    code, out, err = run_cli(capsys, "trace", "show", tmp_path / "s.json", "--model", tiny_model_dir, "--json")
    assert code == 2 and "pass --corpus" in json.loads(out)["error"]
    (tmp_path / "junk.json").write_text('{"format": "longlens-trace/1"}')
    code, out, err = run_cli(capsys, "trace", "show", tmp_path / "junk.json", *base, "--json")
    assert code == 2 and "'model' is missing" in json.loads(out)["error"]
    code, out, err = run_cli(capsys, "trace", "show", tmp_path / "a.json", "--corpus", docs[0], "--model",
                             tiny_model_dir)
    assert code == 2 and out == "" and "another corpus" in err


@pytest.mark.browser
def test_cli_writes_figures_as_png_and_svg(capsys, tiny_model_dir, corpus_paths, trace, tmp_path):
    trace_file = tmp_path / "t.json"
    trace_file.write_text(trace.to_json())
    code, out, err = run_cli(capsys, "trace", "show", trace_file, "--corpus", *corpus_paths, "--model", tiny_model_dir,
                             "--figures", tmp_path / "figs", "--json")
    assert code == 0, out + err
    names = sorted(Path(p).name for p in json.loads(out)["figures"])
    assert names == sorted(f"{n}.{x}" for n in ("csa-selection", "hca-weights", "mass-split") for x in ("png", "svg"))
    assert (tmp_path / "figs" / "csa-selection.png").read_bytes().startswith(b"\x89PNG")
