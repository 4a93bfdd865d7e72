"""The fast decode step (runtime/compiled.py) against the eager model, the reference.

Uncompiled, its regions are the eager model's own code cut differently: logits, captures and the cache must
be bit-identical. Compiled (inductor, C++), fused loops round differently: logits agree within a relative
1e-5 (max |fast - eager| / max |eager|; ~6e-7 measured on the shipped model) and every CSA selection and
greedy token is identical. A compile that fails falls back to the eager forward with one warning, leaving
the cache as if only the eager path had run.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import runtime
from helpers import SHIPPED
from hf_oracle import CSA, HCA, SL, tiny_config
from runtime import compiled
from runtime.config import ModelConfig
from runtime.generate import decode_one_token, prefill
from runtime.introspect import Capture
from runtime.model import Transformer
from runtime.parallel import Shard
from runtime.timing import LayerTimer

TOL = 1e-5


def tiny_model(seed: int = 0, **over) -> Transformer:
    """Sliding, CSA and HCA layers, hash- and score-routed MoE; top-k 8 so that decode really selects."""
    cfg = tiny_config(layer_types=[SL, CSA, HCA, CSA], index_topk=8, **over)
    model = Transformer(ModelConfig.from_dict(cfg)).init_weights(seed).eval()
    with torch.no_grad():  # non-trivial sinks, mHC bases and gate biases, so a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith(("attn_sink", "ape", "_base")):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model


def decode_both(model, fast, prompt: int, steps: int, seed: int = 0, batch: int = 1):
    """Greedy decode after the same prefill, the eager forward and `fast` in turn: per step (eager logits,
    fast logits, eager capture, fast capture), and both caches."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    caches = [model.new_cache(batch), model.new_cache(batch)]
    with torch.no_grad():
        tok = [model(ids, c, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True) for c in caches]
        out = []
        for _ in range(steps):
            caps = [Capture(), Capture()]
            model.decode_impl, model.fast_decode = "eager", None
            a = model.decode(tok[0], caches[0], caps[0])
            model.decode_impl, model.fast_decode = "fast", fast
            b = model.decode(tok[1], caches[1], caps[1])
            out.append((a[:, -1], b[:, -1], *caps))
            tok = [a[:, -1].argmax(-1, keepdim=True), b[:, -1].argmax(-1, keepdim=True)]
    return out, caches


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def selections(cap: Capture) -> dict:
    return {layer: cap.record(layer).selected for layer in cap.layers if cap.record(layer).selected is not None}


def assert_same_state(ca, cb):
    assert ca.length == cb.length
    sa, sb = ca.state(), cb.state()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert (sa[k] is None) == (sb[k] is None), k
        if sa[k] is not None:
            assert torch.equal(sa[k], sb[k]), k


# dense experts run every expert on all B rows, the eager loop only on the rows routed to it: a matmul over
# another number of rows may round differently, so the dense case is bit-identical at batch 1 (decode's)
@pytest.mark.parametrize("over, batch", [({}, 1), ({"n_routed_experts": 16, "hc_mult": 4}, 2)],
                         ids=["dense-experts", "routed-loop-batch-2"])
def test_uncompiled_regions_are_bit_identical(over, batch):
    # 40 prompt + 30 decode tokens cross CSA (4) and HCA (16) pooling boundaries and fill the 8-token window
    model = tiny_model(**over)
    fast = compiled.FastDecode(model, compile=False)
    assert fast.dense == (model.config.n_routed_experts <= compiled.DENSE_EXPERTS)
    steps, caches = decode_both(model, fast, prompt=40, steps=30, batch=batch)
    for a, b, cap_a, cap_b in steps:
        assert torch.equal(a, b)
        assert cap_a.layers == cap_b.layers
        for layer in cap_a.layers:
            ra, rb = cap_a.record(layer), cap_b.record(layer)
            for f in ("positions", "mass", "selected", "scores", "weights"):
                x, y = getattr(ra, f), getattr(rb, f)
                assert (x is None and y is None) or torch.equal(x, y), (layer, f)
    assert sum(s.numel() for *_, c, _ in steps for s in selections(c).values()) > 0
    assert_same_state(*caches)
    assert fast.failed is None


def test_compiled_step_matches_eager_on_a_tiny_model():
    model = tiny_model(seed=1)
    fast = compiled.FastDecode(model)
    steps, caches = decode_both(model, fast, prompt=40, steps=24)
    assert fast.failed is None and fast.compile_seconds > 0
    for a, b, cap_a, cap_b in steps:
        assert rel(b, a) < TOL
        assert int(a.argmax()) == int(b.argmax())
        sa, sb = selections(cap_a), selections(cap_b)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert caches[0].length == caches[1].length == 40 + 24


def test_compiled_step_matches_eager_on_the_shipped_model(monkeypatch):
    monkeypatch.delenv("LONGLENS_DECODE", raising=False)  # conftest sets eager for the rest of the suite
    model = runtime.load_model(SHIPPED)
    assert model.decode_impl == "fast"  # load_model's default
    fast = compiled.FastDecode(model)
    steps, _ = decode_both(model, fast, prompt=600, steps=8, seed=2)
    assert fast.failed is None
    for a, b, cap_a, cap_b in steps:
        assert rel(b, a) < TOL
        assert int(a.argmax()) == int(b.argmax())
        sa, sb = selections(cap_a), selections(cap_b)
        assert sa and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_decode_one_token_takes_the_fast_step_and_load_model_picks_it(monkeypatch):
    monkeypatch.delenv("LONGLENS_DECODE", raising=False)  # conftest sets eager for the rest of the suite
    model = runtime.load_model(SHIPPED)
    cache = model.new_cache()
    with torch.no_grad():
        logits = prefill(model, list(range(5, 40)), cache, trim=False)
    decode_one_token(model, int(logits.argmax()), cache)
    assert isinstance(model.fast_decode, compiled.FastDecode) and model.fast_decode.failed is None
    assert cache.length == 36
    monkeypatch.setenv("LONGLENS_DECODE", "eager")
    assert runtime.load_model(SHIPPED).decode_impl == "eager"
    assert runtime.load_model(SHIPPED, decode="fast").decode_impl == "fast"
    with pytest.raises(ValueError, match="decode must be"):
        runtime.load_model(SHIPPED, decode="turbo")


@pytest.mark.parametrize("fail_at", [1, 3], ids=["first-region", "after-the-cache-grew"])
def test_a_failed_compile_falls_back_to_eager_once(fail_at, monkeypatch):
    """inductor raising (no C++ compiler, an op it cannot take): the step rewinds the cache, warns once, and
    this and every later step are the eager forward's, bit for bit."""
    calls = []

    def broken(gm, example, options=None):
        calls.append(1)
        if len(calls) >= fail_at:
            raise RuntimeError("no C++ compiler found\nmore detail")
        return gm  # the traced graph runs eagerly: the regions before the failure work

    monkeypatch.setattr(torch._inductor, "compile", broken)
    model = tiny_model(seed=2)
    fast = compiled.FastDecode(model)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        steps, caches = decode_both(model, fast, prompt=21, steps=6)
    said = [w for w in seen if "compiled decode step failed" in str(w.message)]
    assert len(said) == 1 and "RuntimeError: no C++ compiler found" in str(said[0].message)
    assert fast.failed.startswith("RuntimeError")
    for a, b, cap_a, cap_b in steps:
        assert torch.equal(a, b)
        assert all(torch.equal(cap_a.record(k).mass, cap_b.record(k).mass) for k in cap_a.layers)
        assert [len(cap_b._parts[k]) for k in cap_b.layers] == [1] * len(cap_b.layers)  # nothing recorded twice
    assert_same_state(*caches)


def test_where_the_fast_step_does_not_apply_the_forward_runs():
    model = tiny_model(seed=3)
    fast = compiled.FastDecode(model, compile=False)
    cache = model.new_cache()
    ids = torch.tensor([[3]])
    with torch.no_grad():
        assert fast.applies(ids, cache)
        assert not fast.applies(torch.tensor([[3, 4]]), cache)  # more than one token
        assert not fast.applies(torch.tensor([[3], [4]]), cache)  # batch != the cache's
    assert not fast.applies(ids, cache)  # autograd on
    with torch.no_grad(), LayerTimer(model):  # timed: the eager modules carry the timer's hooks
        assert not fast.applies(ids, cache)
    with torch.no_grad():
        model.attn_impl = "eager"
        assert not fast.applies(ids, cache)
        model.attn_impl = "sparse"
        sharded = Transformer(ModelConfig.from_dict(tiny_config()), Shard(0, 2))
        assert not compiled.FastDecode(sharded, compile=False).applies(ids, sharded.new_cache())


def test_enable_warms_up_and_disable_restores_eager():
    model = tiny_model(seed=1)  # the configuration test_compiled_step_matches_eager_on_a_tiny_model compiled
    fast = compiled.enable(model)
    assert model.decode_impl == "fast" and model.fast_decode is fast and fast.failed is None
    assert fast._regions  # compiled during the warm-up
    compiled.disable(model)
    assert model.decode_impl == "eager" and model.fast_decode is None


def test_engine_warm_up_builds_the_step_in_the_background_under_the_lock(monkeypatch, tmp_path):
    """launch.py's engine compiles while the user picks files: the first answer then builds nothing, and a
    forward asked for meanwhile waits for the lock instead of racing the tracer (which swaps parameters)."""
    monkeypatch.delenv("LONGLENS_DECODE", raising=False)
    engine = runtime.Engine.from_dir(SHIPPED)
    model = engine.model
    assert compiled.pending(model)
    with engine.guard():  # a forward in flight: the warm-up waits for it
        thread = engine.warm_up()
        assert thread is not None and thread.is_alive()
        thread.join(0.5)
        assert thread.is_alive() and model.fast_decode is None
    thread.join(600)
    assert not thread.is_alive() and not compiled.pending(model)
    fast = model.fast_decode
    assert fast.failed is None and fast._regions and fast.compile_seconds > 0
    built = fast.compile_seconds
    session = engine.new_session()
    (tmp_path / "notes.txt").write_text("The launch code is 4417.\n" * 20)
    session.load_corpus([tmp_path / "notes.txt"])
    answers = [ev for ev in session.ask("What is the launch code?", runtime.GenerationParams(max_new_tokens=4))
               if isinstance(ev, runtime.Answer)]
    assert answers and fast.compile_seconds == built  # the answer's decode steps built no region
    assert engine.warm_up() is None  # nothing left to build
    monkeypatch.setenv("LONGLENS_DECODE", "eager")
    assert runtime.Engine.from_dir(SHIPPED).warm_up() is None


@pytest.mark.parametrize("compile", [False, True], ids=["uncompiled", "compiled"])
def test_steered_decode_takes_the_fast_step(compile):
    """A counterfactual's steered answer (runtime.steering.Steered) decodes through the fast step too: the same
    logits as the steered eager forward (bit for bit uncompiled, within TOL compiled), the excluded entries
    never picked, the included ones always, and the steering changes the picks."""
    from runtime.generate import decode_one_token
    from runtime.steering import Steered, Steering

    model = tiny_model(seed=4)
    steering = Steering(exclude=((0, 24),), include=((60, 64),), index_topk=6)
    ids = torch.randint(0, model.config.vocab_size, (1, 90), generator=torch.Generator().manual_seed(4))
    fast = compiled.FastDecode(model, compile=compile)
    caches = [model.new_cache(), model.new_cache()]
    with torch.no_grad():
        for c in caches:
            model(ids, c)
        for step in range(6):
            caps = [Capture(), Capture()]
            model.decode_impl, model.fast_decode = "eager", None
            a = decode_one_token(Steered(model, steering), 5 + step, caches[0], caps[0])
            model.decode_impl, model.fast_decode = "fast", fast
            built = len(fast._regions)
            b = decode_one_token(Steered(model, steering), 5 + step, caches[1], caps[1])
            assert len(fast._regions) >= built and fast.failed is None
            if compile:
                assert rel(b, a) < TOL and int(a.argmax()) == int(b.argmax())
            else:
                assert torch.equal(a, b)
            sa, sb = selections(caps[0]), selections(caps[1])
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
            for picks in sb.values():
                got = set(picks.flatten().tolist()) - {-1}
                assert not got & set(range(0, 24 // 4)) and set(range(60 // 4, 64 // 4)) <= got
    assert fast._regions  # the fast step ran (and was not stepped around)
    plain = Capture()
    with torch.no_grad():
        model.decode(torch.tensor([[3]]), caches[1], plain)
    assert any(set(range(0, 6)) & set(p.flatten().tolist()) for p in selections(plain).values())
