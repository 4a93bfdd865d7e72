"""Logits parity with transformers 5.24 `deepseek_v4` on the same random weights (fp32)."""

import pytest
import torch

from hf_oracle import CSA, HCA, SL, random_hf_model, tiny_config

import runtime

CONFIGS = {
    # Flash-like: two sliding layers, then CSA/HCA interleaved; 3 hash layers; hc_mult 4
    "flash": tiny_config(num_hidden_layers=5, layer_types=[SL, SL, CSA, HCA, CSA],
                         mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 2, hc_mult=4, o_groups=2),
    # Pro-like: HCA first layers; score-routed MoE only; 4 output groups; hc_mult 2
    "pro": tiny_config(layer_types=[HCA, HCA, CSA, HCA], mlp_layer_types=["moe"] * 4, o_groups=4, hc_mult=2,
                       num_attention_heads=8),
    # plain rope (no YaRN), sigmoid routing, one group
    "plain": tiny_config(rope_parameters=None, scoring_func="sigmoid", o_groups=1, hc_mult=3),
}
T = 300  # crosses HCA windows (rate 16 here), CSA windows and the sliding window (8) many times
# index_topk (128 in these configs) is above the 75 CSA entries of T tokens: topk's order among exact
# ties (ReLU zeros) is arbitrary in both implementations, so parity is checked where ties cannot
# matter. Selection with index_topk far below the entry count is checked against the eager
# (transformers-style dense mask) path in test_cache.py.
for _c in CONFIGS.values():
    _c["index_topk"] = 128


def _ids(n, vocab=97, seed=1):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    hf = random_hf_model(cfg, seed=hash(request.param) % 1000)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, runtime.load_model(folder), folder


@torch.no_grad()
def test_full_forward_matches_transformers(pair):
    hf, model, _ = pair
    ids = _ids(T)
    ref = hf(ids).logits
    assert _rel(model(ids), ref) < 1e-4
    model.attn_impl = "eager"
    try:
        assert _rel(model(ids), ref) < 1e-4
    finally:
        model.attn_impl = "sparse"


@torch.no_grad()
def test_cached_decode_matches_transformers_cache(pair):
    """prefill -> decode -> prefill against transformers' own DynamicCache path."""
    from transformers import DynamicCache

    hf, model, _ = pair
    ids = _ids(T, seed=2)
    hc, cache = DynamicCache(config=hf.config), model.new_cache()
    for s, e in ((0, 150), (150, 151), (151, 152), (152, 260), (260, 261), (261, T)):
        ref = hf(ids[:, s:e], cache=hc, use_cache=True).logits
        assert _rel(model(ids[:, s:e], cache), ref) < 1e-4, (s, e)
    assert cache.length == T


@torch.no_grad()
def test_official_names_and_quantised_copy_load(pair, tmp_path):
    """The same weights under official names, and FP8/FP4-quantised, load and match."""
    from runtime.checkpoint import read_config
    from runtime.quant import save_official

    hf, model, folder = pair
    ids = _ids(120, seed=3)
    ref = model(ids)
    state = {k: v for k, v in model.state_dict().items()}
    cfg = read_config(folder)
    save_official(state, tmp_path / "official", cfg, quantize=False, shards=2)
    assert _rel(runtime.load_model(tmp_path / "official")(ids), ref) < 1e-6

    save_official(state, tmp_path / "fp8", cfg, quantize=True)
    quant = runtime.load_model(tmp_path / "fp8")  # FP8 / FP4 kept as stored, dequantised on the fly
    deq = runtime.load_model(tmp_path / "fp8", quantized="dequantize")  # expanded at load: the reference
    assert torch.equal(quant(ids), deq(ids))
    w, wq = model.layers[1].attn.wq_b.weight, deq.layers[1].attn.wq_b.weight
    assert quant.layers[1].attn.wq_b.weight.dtype == torch.float8_e4m3fn
    assert not torch.equal(w, wq) and _rel(wq, w) < 0.1  # really quantised, and close
