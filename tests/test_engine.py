"""Engine and sessions on a random tiny model: chunked prefill = one forward, chat turns extend the cache
(no corpus prefill on the second question), streaming and stop, limits refused up front, provenance
mapping of attended entries back to file and line."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import NEEDLE, drain, write_corpus
from hf_oracle import CSA, HCA, SL

from runtime import Capture
from runtime.corpus import Layout, ingest
from runtime.engine import Cancelled, ContextTooLarge, Engine, EngineError, GenerationParams, Piece, sample_next
from runtime.provenance import compute_provenance


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_dir(tiny_model_dir, chunk_size=128)


@pytest.fixture(scope="module")
def loaded(engine, corpus_paths):
    """A session with the corpus prefilled, and the progress reports it made."""
    reports = []
    session = engine.new_session()
    report = session.load_corpus(corpus_paths, progress=reports.append)
    return session, report, reports


def test_chunked_prefill_equals_one_forward(engine, loaded):
    session, report, progress = loaded
    ids = engine.preamble + list(session.layout.ids)
    assert report.tokens == len(ids) == session.n_tokens == session.corpus_tokens and report.source == "prefill"
    assert len(ids) > 3 * engine.chunk_size  # really chunked
    with torch.no_grad():
        full = engine.model(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(session.last_logits, full, atol=1e-4, rtol=1e-4)
    # progress: every chunk, monotone, ends at the total, per layer kind timings
    assert [p.done for p in progress] == sorted({min(s + 128, len(ids)) for s in range(0, len(ids), 128)})
    assert progress[-1].done == progress[-1].total == len(ids) and progress[-1].eta_s == 0
    assert set(progress[-1].layer_s) == {"sliding", "csa", "hca", "moe"}
    assert all(v > 0 for v in progress[-1].layer_s.values()) and progress[-1].tokens_per_s > 0
    assert report.timings["layer_s"] == progress[-1].layer_s


def test_chat_extends_the_cache_exactly(engine, loaded):
    session, _, _ = loaded
    session.reset_chat()
    tok = engine.tokenizer
    n0 = session.n_tokens
    _, a1 = drain(session.ask("Where is the launch code?", GenerationParams(max_new_tokens=4)))
    q1 = tok.encode("Where is the launch code?")
    assert a1.timings["prefill_tokens"] == len(q1) + 1  # question + <Assistant>: the corpus is not prefilled again
    _, a2 = drain(session.ask("And the river notes?", GenerationParams(max_new_tokens=3)))
    q2 = tok.encode("And the river notes?")
    second = a2.timings["prefill_tokens"]
    assert second <= len(q2) + 4 and second < 0.05 * n0  # answer tail + EOS + <User> + question + <Assistant>
    assert a2.timings["decode_tokens"] >= 1 and a2.timings["decode_tokens_per_s"] > 0
    # the conversation layout, token for token (an answer's unfed last token waits for the next turn)
    fed2 = a2.token_ids if a2.stop_reason == "eos" else a2.token_ids[:-1]
    expect = q1 + [tok.assistant_id] + a1.token_ids + [tok.eos_id, tok.user_id] + q2 + [tok.assistant_id] + fed2
    assert session.chat_ids == expect and session.n_tokens == n0 + len(expect)
    # the incrementally built cache continues exactly like one forward over the whole context
    with torch.no_grad():
        full = engine.model(torch.tensor([engine.preamble + list(session.layout.ids) + expect]))[0, -1]
    torch.testing.assert_close(session.last_logits, full, atol=1e-4, rtol=1e-4)
    assert [t.question for t in session.history] == ["Where is the launch code?", "And the river notes?"]


def test_reset_chat_rewinds_to_the_corpus(engine, loaded):
    session, _, _ = loaded
    session.reset_chat()
    corpus_logits = session.last_logits.clone()
    _, first = drain(session.ask("What is the secret?", GenerationParams(max_new_tokens=3)))
    drain(session.ask("Again?", GenerationParams(max_new_tokens=2)))
    session.reset_chat()
    assert session.n_tokens == session.corpus_tokens and session.history == [] and session.chat_ids == []
    assert torch.equal(session.last_logits, corpus_logits)
    _, again = drain(session.ask("What is the secret?", GenerationParams(max_new_tokens=3)))
    assert again.token_ids == first.token_ids and again.timings["prefill_tokens"] == first.timings["prefill_tokens"]


def test_undo_turn_rewinds_one_turn(engine, loaded):
    """undo_turn takes back the last question only: earlier turns stay in the cache, nothing is prefilled
    again, and asking the same question again gives the same answer from the same state."""
    session, _, _ = loaded
    session.reset_chat()
    assert not session.can_undo()
    _, first = drain(session.ask("What is the secret?", GenerationParams(max_new_tokens=3)))
    after_first = (session.n_tokens, list(session.chat_ids), list(session.pending), session.last_logits.clone())
    _, second = drain(session.ask("And the other one?", GenerationParams(max_new_tokens=4)))
    assert session.n_tokens > after_first[0] and session.can_undo()
    removed = session.undo_turn()
    assert removed.question == "And the other one?" and len(session.history) == 1
    assert (session.n_tokens, session.chat_ids, session.pending) == after_first[:3]
    assert torch.equal(session.last_logits, after_first[3])
    _, again = drain(session.ask("And the other one?", GenerationParams(max_new_tokens=4)))
    assert again.token_ids == second.token_ids
    assert again.timings["prefill_tokens"] == second.timings["prefill_tokens"]  # the turn only, not the corpus
    session.undo_turn(), session.undo_turn()
    assert session.n_tokens == session.corpus_tokens and session.history == [] and not session.can_undo()
    with pytest.raises(EngineError, match="no turn to undo"):
        session.undo_turn()
    _, again_first = drain(session.ask("What is the secret?", GenerationParams(max_new_tokens=3)))
    assert again_first.token_ids == first.token_ids


def test_streaming_and_stop(engine, loaded):
    session, _, _ = loaded
    session.reset_chat()
    gen = session.ask("Tell me everything.", GenerationParams(max_new_tokens=50))
    pieces = []
    for ev in gen:
        if isinstance(ev, Piece):
            pieces.append(ev)
            if len(pieces) == 2:
                session.stop()  # checked before the next token is computed
        else:
            answer = ev
    assert answer.stop_reason == "stopped" and len(answer.token_ids) == 2
    assert "".join(p.text for p in pieces) == answer.text == engine.tokenizer.decode(answer.token_ids)
    assert [p.token_id for p in pieces if p.token_id is not None] == answer.token_ids
    # a stop event passed in works the same; then closing a generator mid-answer keeps the session usable
    ev = threading.Event()
    gen = session.ask("More?", GenerationParams(max_new_tokens=50), stop=ev)
    next(gen)
    ev.set()
    assert drain(gen)[1].stop_reason == "stopped"
    gen = session.ask("Even more?", GenerationParams(max_new_tokens=50))
    next(gen)
    with pytest.raises(EngineError, match="still streaming"):
        session.ask("Interrupting?")
    gen.close()
    assert session.history[-1].stop_reason == "closed"
    _, last = drain(session.ask("Still there?", GenerationParams(max_new_tokens=2)))
    assert last.stop_reason == "max_new_tokens" and len(last.token_ids) == 2
    with torch.no_grad():  # the interrupted turns were closed properly: cache == one forward
        full = engine.model(torch.tensor([engine.preamble + list(session.layout.ids) + session.chat_ids]))[0, -1]
    torch.testing.assert_close(session.last_logits, full, atol=1e-4, rtol=1e-4)


def test_prefill_can_be_cancelled(engine, corpus_paths):
    session = engine.new_session()
    seen = []

    def progress(p):
        seen.append(p.done)
        session.stop()  # e.g. the UI's cancel button, pressed during the first chunk
    with pytest.raises(Cancelled, match="after 128 of"):
        session.load_corpus(corpus_paths, progress=progress)
    assert seen == [128] and session.n_tokens == 0 and session.layout is None
    assert session.load_corpus(corpus_paths).tokens == session.n_tokens > 0  # usable again


def test_sampling_parameters():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    assert sample_next(logits, GenerationParams(), None) == 1
    assert sample_next(logits, GenerationParams(temperature=5.0, top_k=1), None) == 1
    g = lambda: torch.Generator().manual_seed(0)
    draws = [sample_next(logits, GenerationParams(temperature=1.0, seed=0), gen)
             for gen in [g()] for _ in range(200)]
    assert set(draws) > {1, 2}
    nucleus = {sample_next(logits, GenerationParams(temperature=1.0, top_p=0.5), gen) for gen in [g()] for _ in range(100)}
    assert nucleus == {1, 2}
    top2 = {sample_next(logits, GenerationParams(temperature=10.0, top_k=2), gen) for gen in [g()] for _ in range(100)}
    assert top2 == {1, 2}
    with pytest.raises(EngineError):
        GenerationParams(top_p=0)


def test_seeded_sampling_is_reproducible(engine, loaded):
    session, _, _ = loaded
    params = GenerationParams(max_new_tokens=3, temperature=1.0, top_p=0.9, seed=11)
    runs = []
    for _ in range(2):
        session.reset_chat()
        runs.append(drain(session.ask("Pick something.", params))[1].token_ids)
    assert runs[0] == runs[1]


def test_too_large_corpus_refused_before_prefill(corpus_paths, engine):
    n = len(engine.preamble) + len(Layout.build(ingest(corpus_paths), engine.tokenizer.encode_with_offsets).ids)
    small = Engine(engine.model, engine.tokenizer, max_context_tokens=400, chat_reserve_tokens=64)
    session = small.new_session()
    with pytest.raises(ContextTooLarge) as e:
        session.load_corpus(corpus_paths)
    msg = str(e.value)
    assert f"{n:,} tokens" in msg and "at most 336 fit" in msg and "max_context_tokens" in msg
    assert "nothing was truncated" in msg and "b.txt" in msg and e.value.fits == 336
    assert session.n_tokens == 0 and session.layout is None
    tight = Engine(engine.model, engine.tokenizer, memory_budget_bytes=20_000, chat_reserve_tokens=64)
    with pytest.raises(ContextTooLarge, match=r"memory budget is 19\.5 KiB") as e:
        tight.new_session().load_corpus(corpus_paths)
    per = tight.cache_bytes_per_token()
    cfg = engine.config
    # 2 CSA (fp32 entries, indexer keys in the Engine's index_dtype: runtime/isa.py's choice) + 1 HCA
    key = tight.index_dtype.itemsize
    assert per == 2 * (4 * cfg.head_dim + key * cfg.index_head_dim) / 4 + 4 * cfg.head_dim / 16
    assert e.value.fits == int((20_000 - tight.fixed_cache_bytes()) / per) - 64
    # the model's own context is a limit too
    huge = write_corpus(Path(corpus_paths[0]).parent.parent / "huge", lines=700, needle_at=None)
    with pytest.raises(ContextTooLarge, match="max_position_embeddings"):
        engine.new_session().load_corpus(huge)


def test_cache_estimate_matches_the_real_cache(engine, loaded):
    session, _, _ = loaded
    session.reset_chat()
    real = session.cache_bytes()
    est = engine.estimate_cache_bytes(session.n_tokens)
    assert real["total"] <= est <= real["total"] + engine.fixed_cache_bytes()
    assert session.dense_cache_bytes() == engine.config.num_hidden_layers * session.n_tokens * 16 * 4


# ----------------------------------------------------------------------------------------- provenance
def _needle_tokens(session, name="b.txt", line=17):
    lay = session.layout
    (d,) = [d for d in lay.documents if d.name.endswith(name)]
    toks = [t for t in range(d.text_start, d.text_end) if lay.lines[t] == line]
    return toks[0] + session.offset, toks[-1] + 1 + session.offset  # context positions


def test_provenance_maps_planted_selection_to_file_and_line(engine, loaded):
    """A capture whose CSA picks and HCA weights point at the needle: the sources must name its line."""
    session, _, _ = loaded
    session.reset_chat()
    cfg, n = engine.config, session.n_tokens
    a, b = _needle_tokens(session)
    needle_entries = list(range(a // 4, (b - 1) // 4 + 1))  # CSA entries (rate 4) covering the needle
    far = [_needle_tokens(session, "a.txt", 5)[0] // 4, _needle_tokens(session, "c.md", 10)[0] // 4]  # light picks
    cap = Capture()
    positions = torch.tensor([n - 1, n])  # two answer tokens
    mass = torch.tensor([[[0.2, 0.7, 0.1]] * 2])
    for layer in (1, 3):
        sel = torch.tensor([[needle_entries + far] * 2])
        w = torch.tensor([[[0.5 / len(needle_entries)] * len(needle_entries) + [0.01] * len(far)] * 2])
        cap.add(layer, CSA, positions, mass, sel, w, w)
    hca = torch.zeros(1, 2, n // 16)
    hca[0, :, a // 16] = 0.3
    cap.add(2, HCA, positions, mass, None, None, hca)
    cap.add(0, SL, positions, mass, None, None, None)
    prov = compute_provenance(cap, cfg, session.layout, session.offset, [n - 1, n], n + 1, [5, 6], ["x", "y"])
    top = prov.sources[0]
    assert top.file.endswith("b.txt") and top.line_start <= 17 <= top.line_end and top.line_end - top.line_start <= 2
    assert NEEDLE in top.snippet and top.layers == (1, 2, 3)
    assert 0.8 < top.weight <= 1 and abs(sum(s.weight for s in prov.sources) - 1) < 1e-6
    assert {s.file.rsplit("/", 1)[-1] for s in prov.sources[1:]} <= {"a.txt", "b.txt", "c.md"}
    # heatmap arrays: summed weight and pick counts per entry, in context positions
    assert prov.csa[1].shape == ((n + 1) // 4,) and prov.csa_counts[3][needle_entries].tolist() == [2] * len(needle_entries)
    assert np.isclose(prov.csa[1].sum(), 2 * 0.52) and np.isclose(prov.hca[2][a // 16], 0.6)
    assert prov.mass[0] == pytest.approx((0.2, 0.7, 0.1)) and prov.rates == {1: 4, 2: 16, 3: 4}
    # per token, and hover text for figures
    assert [t.text for t in prov.tokens] == ["x", "y"] and prov.tokens[1].token_id == 6
    assert prov.tokens[0].sources[0].line_start <= 17 <= prov.tokens[0].sources[0].line_end
    ids, w = prov.tokens[0].entries[1]
    assert ids[:len(needle_entries)].tolist() == needle_entries and w[0] == w.max()
    assert "b.txt:17-17" in prov.describe(a, b)
    assert [d[0] for d in prov.docs] == [d.name for d in session.layout.documents]
    assert prov.docs[0][1] == session.offset


def test_provenance_of_a_real_answer(engine, loaded):
    session, _, _ = loaded
    session.reset_chat()
    _, ans = drain(session.ask("Where is the launch code?", GenerationParams(max_new_tokens=3)))
    prov = ans.provenance
    assert len(prov.tokens) == len(ans.token_ids) == 3
    first_query = session.corpus_tokens + ans.timings["prefill_tokens"] - 1
    assert [t.position for t in prov.tokens] == [first_query, first_query + 1, first_query + 2]
    for layer, counts in prov.csa_counts.items():  # index_topk > entries: every visible entry picked per token
        assert counts.sum() == sum((t.position + 1) // 4 for t in prov.tokens)
    for layer, w in prov.hca.items():
        assert w.shape == (prov.n_context // 16,)
    assert 0 < sum(s.weight for s in prov.sources) <= 1 + 1e-9 and prov.sources
    for s in prov.sources:  # every source is text of the corpus at the lines it names
        spans = session.locate(s.token_start, s.token_end)
        assert [(x.name, x.line_start, x.line_end) for x in spans] == [(s.file, s.line_start, s.line_end)]
        assert s.layers and set(s.layers) <= {1, 2, 3}
    assert set(prov.mass) == {0, 1, 2, 3}
    assert all(abs(sum(m) - 1) < 1e-4 for m in prov.mass.values())
    assert prov.to_dict(top=2)["sources"] == [s.to_dict() for s in prov.sources[:2]]


def test_plain_chat_without_corpus(engine):
    session = engine.new_session()
    _, ans = drain(session.ask("Hello?", GenerationParams(max_new_tokens=2)))
    assert session.chat_ids[:2] == engine.preamble and ans.provenance.sources == []
    with pytest.raises(EngineError, match="empty"):
        session.ask("   ")
