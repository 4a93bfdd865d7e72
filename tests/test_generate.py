"""The generation core (runtime/generate.py) with a mock model, and the one-path guarantee: evaluation
and the app's sessions give the same tokens for the same prompt."""

import pytest
import torch

from runtime.errors import Cancelled
from runtime.generate import Generation, GenerationParams, decode_one_token, generate, prefill, sample_next

V = 16


class Cache:
    def __init__(self):
        self.length, self.reserved = 0, []

    def reserve(self, tokens):
        self.reserved.append(tokens)


class ScriptedModel:
    """After a token t, the next token's logits peak at (t + 1) % V; records each call's ids and capture."""
    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def __call__(self, x, cache, capture=None, logits_to_keep=0):
        ids = x[0].tolist()
        self.calls.append((ids, capture))
        cache.length += len(ids)
        return torch.nn.functional.one_hot((x[:, -1:] + 1) % V, V).float() * 5.0  # [1, 1, V]


def test_prefill_chunks_progress_reserve_and_capture_last():
    m, cache, seen = ScriptedModel(), Cache(), []
    cap = object()
    logits = prefill(m, list(range(10)), cache, chunk_size=4, capture=cap, reserve_tokens=64,
                     on_chunk=lambda d, t: seen.append((d, t)), trim=False)
    assert [ids for ids, _ in m.calls] == [[0, 1, 2, 3], [4, 5, 6, 7], [8], [9]]
    assert [c for _, c in m.calls] == [None, None, None, cap]  # only the last query is captured
    assert seen == [(4, 10), (8, 10), (9, 10), (10, 10)]
    assert cache.length == 10 and cache.reserved == [64, 64, 64]
    assert int(logits.argmax()) == 10  # after the last id, 9
    assert prefill(m, [], Cache()) is None


def test_prefill_stops_between_chunks():
    m, cache = ScriptedModel(), Cache()
    with pytest.raises(Cancelled, match="after 4 of 12"):
        prefill(m, list(range(12)), cache, chunk_size=4, should_stop=lambda: cache.length >= 4, trim=False)
    assert cache.length == 4


def test_generation_stops_at_stop_id_without_yielding_it():
    m, cache = ScriptedModel(), Cache()
    logits = prefill(m, [3], cache, trim=False)
    gen = Generation(m, cache, logits, GenerationParams(max_new_tokens=50), stop_ids={7})
    assert list(gen) == [4, 5, 6]
    assert gen.stop_reason == "eos"
    assert gen.fed == 3 and gen.pending == [] and cache.length == 4


def test_generation_max_new_tokens_leaves_the_last_token_unfed():
    m, cache = ScriptedModel(), Cache()
    gen = Generation(m, cache, prefill(m, [0], cache, trim=False), GenerationParams(max_new_tokens=3))
    assert list(gen) == [1, 2, 3]
    assert gen.stop_reason == "max_new_tokens"
    assert gen.fed == 2 and gen.pending == [3]  # no forward pass for a token nothing reads
    assert cache.length == 3 and int(gen.logits.argmax()) == 3


def test_generation_context_full_and_stop_and_close():
    m, cache = ScriptedModel(), Cache()
    gen = Generation(m, cache, prefill(m, [0, 1, 2], cache, trim=False), GenerationParams(), max_context=6)
    assert list(gen) == [3, 4, 5] and gen.stop_reason == "context_full"
    assert cache.length + 2 > 6 and cache.length + 1 <= 6

    flag = []
    gen = Generation(m, Cache(), torch.zeros(V), GenerationParams(), should_stop=lambda: bool(flag))
    it = iter(gen)
    assert next(it) == 0
    flag.append(1)
    assert list(it) == [] and gen.stop_reason == "stopped"

    gen = Generation(m, Cache(), torch.zeros(V), GenerationParams())
    it = iter(gen)
    next(it)
    it.close()
    assert gen.stop_reason == "closed" and gen.tokens == [0]


def test_generate_and_decode_one_token():
    m = ScriptedModel()
    gen = generate(m, [5, 6], Cache(), GenerationParams(max_new_tokens=4), stop_ids={0}, chunk_size=1)
    assert gen.tokens == [7, 8, 9, 10]
    cache = Cache()
    assert int(decode_one_token(m, 15, cache).argmax()) == 0 and cache.length == 1


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert sample_next(logits, GenerationParams(), None) == 1
    g = lambda: torch.Generator().manual_seed(0)
    a = [sample_next(logits, GenerationParams(temperature=1.0), gen) for gen in [g()] for _ in range(20)]
    b = [sample_next(logits, GenerationParams(temperature=1.0), gen) for gen in [g()] for _ in range(20)]
    assert a == b and set(a) > {1}
    assert {sample_next(logits, GenerationParams(temperature=10.0, top_k=2), gen) for gen in [g()] for _ in range(50)} \
        == {1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("index_dtype", [None, torch.bfloat16])
def test_eval_and_app_answer_with_the_same_tokens(shipped_engine, index_dtype):
    """The published accuracy is measured on the path the app serves: same prompt, same tokens."""
    from runtime import Engine
    from runtime.evaluate import answer_ids

    base = shipped_engine
    engine = Engine(base.model, base.tokenizer, index_dtype=index_dtype)
    tok = engine.tokenizer
    hay = " ".join(f"Line {i}: the harbour log notes calm water and {i * 7} gulls." for i in range(60))
    question = hay + "\n\nThe vault code is 58213.\n\nWhat is the vault code?"
    session = engine.new_session()
    *_, answer = session.ask(question, GenerationParams(max_new_tokens=12))
    prompt = tok.render_chat([{"role": "user", "content": question}])
    assert session.chat_ids[:len(prompt)] == prompt  # the same context layout
    ids = answer_ids(engine.model, tok, prompt, engine.model.new_cache(index_dtype=index_dtype), 12,
                     capture=__import__("runtime").Capture())
    assert ids == answer.token_ids and len(ids) > 0
