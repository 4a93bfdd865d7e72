"""Counterfactual selection (runtime/steering.py): spans forced out of / into every CSA layer's top-k, or its
width changed, for one forward; a session's turn answered again from its cache mark under it; the CLI flags.

Model-level tests run the random tiny model (tests/conftest.py `tiny_model_dir`: CSA layers 1 and 3 at 4:1,
window 8); the done-when test runs the shipped model on the app's sample corpus (assets/examples), whose
lighthouse_log.md holds the planted fact the sample question asks for."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import drain

import runtime
from runtime.attention import select_topk
from runtime.corpus import Corpus, Document, Layout
from runtime.errors import EngineError
from runtime.generate import GenerationParams
from runtime.steering import (Steering, check_specs, count_lines, entry_range, entry_tokens, parse_span,
                              span_tokens)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "assets" / "examples"
SAMPLE_QUESTION = "What is the access code for the misty lighthouse?"
SAMPLE_VALUE = "5820417"  # assets/examples/lighthouse_log.md:22
T = 160  # tokens of the model-level tests: 40 entries per CSA layer


# ------------------------------------------------------------------------------------ specs -> token ranges
def _chars(text):
    """A character-level encoder, except that a run of newlines is one token (as BPE merges "\n\n")."""
    ids, offsets = [], []
    for i, c in enumerate(text):
        if c == "\n" and i and text[i - 1] == "\n":
            offsets[-1] = (offsets[-1][0], i + 1)
        else:
            ids.append(ord(c) % 8192)
            offsets.append((i, i + 1))
    return ids, offsets


@pytest.fixture(scope="module")
def layout():
    docs = [Document("docs/a.txt", "one\ntwo\nthree\n\nfive\n", "text"), Document("docs/b.md", "x\ny", "markdown"),
            Document("other.txt", "solo", "text")]
    return Layout.build(Corpus(docs), _chars)


def test_line_specs_become_token_ranges(layout):
    off = 7  # the corpus's token 0 at context position 7 (the chat preamble before it)
    a = layout.documents[0]
    ((s, e),) = span_tokens("docs/a.txt:2-3", layout, off)
    assert "".join(chr(i) for i in layout.ids[s - off:e - off]) == "two\nthree\n"  # "\n\n" starts on line 3
    assert [(x.name, x.line_start, x.line_end) for x in layout.locate(s - off, e - off)] == [("docs/a.txt", 2, 3)]
    assert span_tokens("docs/a.txt:5", layout, off) == span_tokens("./docs//a.txt:5-5", layout, off)
    assert span_tokens("docs/a.txt", layout, off) == [(a.token_start + off, a.token_end + off)]  # header included
    # a folder: every document under it, adjacent ones merged
    assert span_tokens("docs", layout, off) == span_tokens("docs/", layout, off) == [
        (a.token_start + off, layout.documents[1].token_end + off)]
    st = Steering.from_specs(layout, off, exclude=["docs/b.md:2", (3, 5)], include=["other.txt"], index_topk=3)
    assert st.exclude[1] == (3, 5) and len(st.include) == 1 and st.index_topk == 3 and not st.empty


@pytest.mark.parametrize("spec, words", [
    ("nope.txt", "no document named 'nope.txt'"), ("docs/a.txt:0", "numbered from 1"),
    ("docs/a.txt:3-2", "START must not be after END"), ("docs/a.txt:9", "has 5 lines"),
    ("docs/a.txt:4", "no text tokens start on line 4"), ("docs/a.txt:2-", "expected FILE:START-END"),
    ("docs:1-2", "is a folder"), ("", "empty")])
def test_bad_specs_are_bad_requests(layout, spec, words):
    with pytest.raises(EngineError, match=words) as e:
        span_tokens(spec, layout, 0)
    assert e.value.code == "bad_request"


def test_spec_helpers_and_steering_validation(layout):
    assert parse_span("a.txt") == ("a.txt", None, None) and parse_span("a.txt:4") == ("a.txt", 4, 4)
    assert parse_span("c:/x.txt:3-9") == ("c:/x.txt", 3, 9)
    for text in ("a", "a\n", "a\nb", "a\n\n", "\n", "a\r\nb\n"):  # the corpus Layout's own line count
        assert count_lines(text) == Layout.build(Corpus([Document("t", text, "text")]), _chars).documents[0].n_lines
    check_specs(["docs/a.txt:1-5", "docs"], [(d.name, d.n_lines) for d in layout.documents])
    with pytest.raises(EngineError, match="has 5 lines"):
        check_specs(["docs/a.txt:6"], [(d.name, d.n_lines) for d in layout.documents])
    assert entry_range(5, 9, 4) == (1, 3) and entry_range(8, 12, 4) == (2, 3) and entry_tokens(3, 4) == (12, 16)
    for bad in (dict(exclude=[(5, 5)]), dict(include=[(-1, 3)]), dict(exclude=["x"]), dict(index_topk=0),
                dict(index_topk=2.5)):
        with pytest.raises(EngineError):
            Steering(**bad)
    assert Steering().empty and Steering(exclude=[[1, 2]]).exclude == ((1, 2),)
    ex, inc = Steering(exclude=[(5, 9)], include=[(100, 200)]).entry_masks(10, 4)
    assert ex.nonzero().flatten().tolist() == [1, 2] and inc is None  # the include lies past the 10 entries


# ------------------------------------------------------------------------------------ the model's selection
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return runtime.load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 8192, (1, T + 4), generator=torch.Generator().manual_seed(11))


@torch.no_grad()
def run(model, ids, steering=None, impl="sparse", cache=None, start=0):
    """Feed ids[:, start:T] in one forward, then the rest one token at a time, all with `steering`:
    (logits [1, S, vocab], capture of every query, cache)."""
    model.attn_impl = impl
    try:
        cache = model.new_cache() if cache is None else cache
        cap, outs = runtime.Capture(), []
        kw = {} if steering is None else {"steering": steering}
        outs.append(model(ids[:, start:T], cache, capture=cap, **kw))
        for t in range(T, ids.shape[1]):
            outs.append(model(ids[:, t:t + 1], cache, capture=cap, **kw))
        return torch.cat(outs, dim=1), cap, cache
    finally:
        model.attn_impl = "sparse"


def csa_layers(model):
    return [i for i, t in enumerate(model.config.layer_types) if t == runtime.CSA]


def picks(cap, layer):
    rec = cap.record(layer)
    return rec.positions, rec.selected[0], rec.weights[0]


@pytest.mark.parametrize("impl", ["sparse", "eager"])
@pytest.mark.parametrize("topk", [None, 4])
def test_excluded_entries_are_never_selected(tiny, ids, impl, topk):
    """Every CSA layer, every query (prefill and decode): no excluded entry among the picks, and the picks
    are full wherever enough other entries are visible; without the exclusion they were picked."""
    ex = Steering(exclude=[(41, 58), (120, 121)], index_topk=topk)  # entries 10-14 and 30 at 4:1
    banned = {10, 11, 12, 13, 14, 30}
    _, cap, _ = run(tiny, ids, ex, impl)
    _, free, _ = run(tiny, ids, Steering(index_topk=topk), impl)
    k = topk or tiny.config.index_topk
    for layer in csa_layers(tiny):
        pos, sel, w = picks(cap, layer)
        assert not set(sel[sel >= 0].tolist()) & banned
        assert torch.all(w[sel < 0] == 0)
        visible = (pos + 1) // 4
        allowed = visible - torch.tensor([sum(e < v for e in banned) for v in visible.tolist()])
        assert torch.equal((sel >= 0).sum(-1), torch.clamp(allowed, max=k))
        _, fsel, _ = picks(free, layer)
        assert set(fsel[fsel >= 0].tolist()) & banned  # the exclusion took something away


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sparse", "eager"])
def test_exclusion_is_exact(tiny, ids, impl):
    """An excluded entry is never read: with the steering, the logits of later queries do not change by one
    bit when the excluded entries' keys and values (and indexer keys) are replaced by noise in every CSA layer."""
    st = Steering(exclude=[(16, 40)], index_topk=5)
    _, _, cache = run(tiny, ids[:, :T], st, impl)  # the context, its entries built under the steering
    twin = runtime.Cache.from_state(tiny.config, cache.state(), cache.length, cache.entry_counts())
    g = torch.Generator().manual_seed(0)
    for layer in csa_layers(tiny):
        for comp in (twin.layers[layer].kv, twin.layers[layer].index):
            rows = comp.entries.data[:, 4:10]
            rows.add_(torch.randn(rows.shape, generator=g) * 100)
    tail = torch.randint(0, 8192, (1, 6), generator=g)
    tiny.attn_impl = impl
    try:
        for t in range(tail.shape[1]):
            a = tiny(tail[:, t:t + 1], cache, steering=st)
            b = tiny(tail[:, t:t + 1], twin, steering=st)
            assert torch.equal(a, b)
        c = tiny(tail[:, :1], twin)  # without the steering the noise is read
        assert not torch.equal(c, tiny(tail[:, :1], runtime.Cache.from_state(
            tiny.config, cache.state(), cache.length, cache.entry_counts())))
    finally:
        tiny.attn_impl = "sparse"


@pytest.mark.parametrize("impl", ["sparse", "eager"])
def test_included_entries_are_always_selected(tiny, ids, impl):
    """index_topk 3 with entries 2-3 forced in: every query that sees them picks them, the third pick by
    score; exclusion wins over inclusion; sparse and eager agree."""
    st = Steering(include=[(8, 16), (100, 104)], exclude=[(100, 104)], index_topk=3)  # entries 2, 3 (25 excluded)
    logits, cap, _ = run(tiny, ids, st, impl)
    for layer in csa_layers(tiny):
        pos, sel, w = picks(cap, layer)
        assert sel.shape[-1] == 3
        for p, row in zip(pos.tolist(), sel.tolist()):
            visible = (p + 1) // 4
            assert {e for e in (2, 3) if e < visible} <= set(row) and 25 not in row
            assert sum(e >= 0 for e in row) == min(3, visible - (visible > 25))
    if impl == "eager":
        torch.testing.assert_close(logits, run(tiny, ids, st, "sparse")[0], rtol=1e-4, atol=1e-4)


def test_index_topk_sets_the_width(tiny, ids):
    _, cap, _ = run(tiny, ids, Steering(index_topk=2))
    _, ref, _ = run(tiny, ids)
    for layer in csa_layers(tiny):
        pos, sel, _ = picks(cap, layer)
        assert sel.shape[-1] == 2 and torch.equal((sel >= 0).sum(-1), torch.clamp((pos + 1) // 4, max=2))
        _, rsel, _ = picks(ref, layer)
        assert (rsel >= 0).sum(-1).max() == T // 4 + 1  # index_topk 512: every visible entry


def test_default_path_is_unchanged(tiny, ids):
    """steering=None, an empty Steering and one that names no existing entry run the default path: the same
    logits to the bit; the steered top-k with nothing forced picks what the default one picks."""
    ref, rcap, _ = run(tiny, ids)
    for st in (None, Steering(), Steering(exclude=[(10_000, 10_004)], index_topk=tiny.config.index_topk)):
        kw = {"steering": st}
        out, cap, _ = run(tiny, ids, **kw)
        assert torch.equal(out, ref)
    g = torch.Generator().manual_seed(1)
    scores = torch.relu(torch.randn(1, 6, 50, generator=g)).round(decimals=1)  # many exact ties
    thr = torch.tensor([3, 10, 20, 30, 45, 50])
    for k in (4, 8, 64):
        a, b = select_topk(scores, thr, k), select_topk(scores, thr, k, exclude=torch.zeros(50, dtype=torch.bool))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------ sessions
@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return runtime.Engine.from_dir(tiny_model_dir, chunk_size=128)


def _ask(session, q, n=4):
    return drain(session.ask(q, GenerationParams(max_new_tokens=n)))[1]


def _state(session):
    return ({k: v.clone() for k, v in session.cache.state().items() if v is not None}, session.cache.length,
            session.cache.entry_counts(), session.last_logits.clone(), list(session.chat_ids), list(session.pending))


def _same_state(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:3] == b[1:3] and torch.equal(a[3], b[3]) and a[4:] == b[4:]


def test_session_counterfactual_restores_the_session(engine, corpus_paths):
    """From the turn's mark, only the turn's tokens are fed; afterwards the session is as it was, and the
    next question answers exactly as in a session where no counterfactual ran; an earlier turn replays its
    own answer as `old`."""
    a, b = engine.new_session(), engine.new_session()
    for s in (a, b):
        s.load_corpus(corpus_paths)
    first = _ask(a, "What is the secret launch code?")
    assert _ask(b, "What is the secret launch code?").token_ids == first.token_ids
    before = _state(a)
    st = a.steering(exclude=[f"{corpus_paths[1]}:10-20"])
    fed = []
    model = a.engine.model

    class Counting:  # the engine's model, counting the tokens each forward feeds
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, ids, *args, **kw):
            fed.append(ids.shape[1])
            return model(ids, *args, **kw)

        def decode(self, ids, *args, **kw):  # one-token steps (the steered ones too) come this way
            fed.append(ids.shape[1])
            return model.decode(ids, *args, **kw)

    a.engine.model = Counting()
    try:
        cf = a.counterfactual(st)
    finally:
        a.engine.model = model
    prompt = cf.new.timings["prefill_tokens"]
    assert not cf.old_replayed and cf.old is not None and cf.old.token_ids == first.token_ids
    assert sum(fed) == cf.timings["fed_tokens"] == prompt + len(cf.new.token_ids) - (cf.new.stop_reason != "eos")
    assert sum(fed) < 40 < a.corpus_tokens  # the question and the answer, no corpus
    _same_state(before, _state(a))
    assert set(cf.selection) == {1, 3}
    for layer, d in cf.selection.items():
        lo, hi = cf.spans[0].token_start // 4, -(-cf.spans[0].token_end // 4)
        assert cf.new.provenance.csa_counts[layer][lo:hi].sum() == 0  # never picked, for any answer token
        assert set(d.dropped.tolist()) >= set(range(lo, hi)) & set(np.flatnonzero(cf.old.provenance.csa_counts[layer]))
        assert cf.spans[0].csa_after[layer] == 0.0 and cf.spans[0].csa_before[layer] > 0
    assert set(cf.mass) == {0, 1, 2, 3} and all(len(m.before) == 3 for m in cf.mass.values())
    assert cf.spans[0].where.startswith(f"{corpus_paths[1]}:10-")
    json.dumps(cf.to_dict())  # plain JSON
    second = _ask(a, "Which river note comes first?")
    assert second.token_ids == _ask(b, "Which river note comes first?").token_ids
    _same_state(_state(a), _state(b))
    again = a.counterfactual(Steering(), GenerationParams(max_new_tokens=4), turn=0)  # replayed from its mark
    assert again.old_replayed and again.old.token_ids == first.token_ids == again.new.token_ids
    assert not again.changed and all(len(d.dropped) == len(d.added) == 0 for d in again.selection.values())
    _same_state(_state(a), _state(b))


def test_session_counterfactual_errors(engine, corpus_paths):
    s = engine.new_session()
    s.load_corpus(corpus_paths)
    with pytest.raises(EngineError, match="ask one first"):
        s.counterfactual(Steering())
    _ask(s, "What is the secret launch code?", 2)
    with pytest.raises(EngineError, match="no turn 3"):
        s.counterfactual(Steering(), turn=3)
    with pytest.raises(EngineError, match="raise index_topk to at least"):
        s.counterfactual(s.steering(include=[str(corpus_paths[0])], index_topk=4))
    with pytest.raises(EngineError, match="no document named"):
        s.steering(exclude=["missing.txt:1-2"])
    with pytest.raises(EngineError, match="needs a Steering"):
        s.counterfactual([(0, 4)])


# ------------------------------------------------------------------------------------ the shipped model
def test_excluding_the_needle_changes_the_answer_and_restoring_brings_it_back(shipped_engine):
    """Done-when of issue 22 point 1: the sample corpus and question; with the needle line's entries kept out
    of the CSA selection the answer is no longer the planted value, and without the steering it is again."""
    session = shipped_engine.new_session()
    session.load_corpus(sorted(p for p in EXAMPLES.iterdir() if p.is_file()))
    params = GenerationParams(max_new_tokens=12)
    asked = drain(session.ask(SAMPLE_QUESTION, params))[1]
    assert asked.text.strip() == SAMPLE_VALUE, asked.text
    needle = f"{EXAMPLES / 'lighthouse_log.md'}:22"
    cf = session.counterfactual(session.steering(exclude=[needle]), params)
    print(f"asked: {asked.text!r}; needle excluded: {cf.new.text!r}")
    assert SAMPLE_VALUE not in cf.new.text and cf.changed
    assert cf.old.text == asked.text and cf.timings["fed_tokens"] < 60 < session.corpus_tokens
    span = cf.spans[0]
    assert span.where == f"{EXAMPLES / 'lighthouse_log.md'}:22-22"
    assert all(span.csa_after[layer] == 0.0 for layer in span.csa_after)
    assert sum(span.csa_before.values()) > 0
    back = session.counterfactual(Steering(), params)
    print(f"no steering: {back.new.text!r}")
    assert back.new.text.strip() == SAMPLE_VALUE and not back.changed
    ref = shipped_engine.new_session()  # the session goes on as one where no counterfactual ran
    ref.load_corpus(sorted(p for p in EXAMPLES.iterdir() if p.is_file()))
    assert drain(ref.ask(SAMPLE_QUESTION, params))[1].token_ids == asked.token_ids
    follow = "What is the access code for the quiet harbour?"
    assert drain(session.ask(follow, params))[1].token_ids == drain(ref.ask(follow, params))[1].token_ids


def test_cli_exclude_include_index_topk(monkeypatch, capsys):
    from runtime.__main__ import main

    monkeypatch.chdir(REPO)
    base = ["ask", "--corpus", "assets/examples", "--question", SAMPLE_QUESTION, "--max-new-tokens", "12"]
    code = main(base + ["--exclude", "assets/examples/lighthouse_log.md:22", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["answer"].strip() == SAMPLE_VALUE
    cf = out["counterfactual"]
    assert cf["changed"] and SAMPLE_VALUE not in cf["answer"] and cf["old_answer"] == out["answer"]
    assert cf["steering"]["exclude_specs"] == ["assets/examples/lighthouse_log.md:22"]
    assert cf["spans"][0]["where"] == "assets/examples/lighthouse_log.md:22-22"
    assert set(cf["selection"]) == {"3"} and set(cf["mass"]) == {"0", "1", "2", "3"}
    code = main(base + ["--index-topk", "64"])  # the config's width: the same answer, printed as text
    text = capsys.readouterr().out
    assert code == 0 and "Counterfactual (index_topk 64): unchanged" in text
    for bad, words in ((["--exclude", "assets/examples/nope.md"], "no document named"),
                       (["--include", "assets/examples/notes.txt:40-41"], "has 13 lines"),
                       (["--exclude", "assets/examples/notes.txt:3-"], "START-END"),
                       (["--index-topk", "0"], "positive integer")):
        code = main(base + bad + ["--json"])
        err = json.loads(capsys.readouterr().out)
        assert code == 2 and words in err["error"] and err["code"] == "bad_request", err
    assert main(["ask", "--corpus", "assets/examples", "--question", "q", "--exclude"]) == 2
    capsys.readouterr()
