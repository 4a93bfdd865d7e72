"""Checkpoint loading: FP8/FP4 dequantisation, the three name spellings, sharding, and error reports.

The spellings come from a tiny random transformers DeepseekV4ForCausalLM: (b) its state_dict(),
(c) its save_pretrained() output, and (a) official names written by save_official from a mapping
spelled out here from the spec table (independent of the loader's rename table), which transformers'
own official->HF converter must load back bit-identically.
"""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.checkpoint import CheckpointError, load_state_dict, read_config
from runtime.quant import (FP4_LUT, FP4_NAMES, FP8_NAMES, dequantize_fp4, dequantize_fp8, quantize_fp4,
                           quantize_fp8, save_official)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pow2(byte_table: torch.Tensor) -> torch.Tensor:
    return torch.pow(2.0, byte_table.double() - 127)


# ---------------------------------------------------------------- dequantisation

def test_fp8_dequant_matches_formula_with_ragged_blocks():
    torch.manual_seed(0)
    w = torch.randn(200, 300) * torch.logspace(-3, 2, 300)  # columns span 5 decades: blocks differ
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert s.shape == (2, 3)  # ceil(200/128), ceil(300/128)
    rows, cols = torch.arange(200) // 128, torch.arange(300) // 128
    formula = q.double() * _pow2(s.view(torch.uint8)[rows][:, cols])  # W = e4m3 * 2^(E-127)
    deq = dequantize_fp8(q, s)
    assert deq.dtype == torch.float32 and torch.equal(deq.double(), formula)
    assert torch.equal(dequantize_fp8(q, s.float()), deq)  # float32 scales give the same
    assert torch.equal(deq.bfloat16().float(), deq)  # exact in bf16
    # e4m3 rounding: half an ulp of 3 mantissa bits, or half the subnormal step 2^-9 of the block scale
    bound = w.abs() * 2 ** -4 + s.float()[rows][:, cols] * 2 ** -10
    assert ((deq - w).abs() <= bound).all()


def test_fp4_nibble_order_and_formula():
    packed = torch.zeros(1, 32, dtype=torch.uint8)
    packed[0, 0], packed[0, 1], packed[0, 16] = 0x71, 0xF8, 0x2C  # (lo, hi) = (1, 7), (8, 15), (12, 2)
    scale = torch.tensor([[127, 128]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 1.0, 2.0
    deq = dequantize_fp4(packed.view(torch.int8), scale)
    assert deq.shape == (1, 64)
    assert deq[0, :4].tolist() == [0.5, 6.0, -0.0, -6.0]  # element 2j = low nibble
    assert deq[0, 32:34].tolist() == [-4.0, 2.0]  # second 32-block: LUT * 2

    torch.manual_seed(1)
    b = torch.randint(0, 256, (4, 48), dtype=torch.uint8)
    e = torch.randint(110, 140, (4, 3), dtype=torch.uint8)
    lut = [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]
    formula = [[lut[(int(b[o, i // 2]) >> (4 * (i % 2))) & 0xF] * 2.0 ** (int(e[o, i // 32]) - 127)
                for i in range(96)] for o in range(4)]
    deq = dequantize_fp4(b.view(torch.int8), e.view(torch.float8_e8m0fnu))
    assert deq.tolist() == formula
    assert torch.equal(dequantize_fp4(b.view(torch.float4_e2m1fn_x2), e.view(torch.float8_e8m0fnu)), deq)


def test_fp4_quantise_round_trip():
    torch.manual_seed(2)
    # values already on the FP4 grid (LUT times a per-block power of two) survive exactly
    codes = torch.randint(0, 16, (8, 64))
    codes[:, ::32] = 7  # each block's amax is the top code 6, so the block scale is exactly the power below
    grid = FP4_LUT[codes] * 2.0 ** torch.randint(-4, 4, (8, 2)).repeat_interleave(32, 1)
    assert torch.equal(dequantize_fp4(*quantize_fp4(grid)), grid)
    w = torch.randn(8, 64)
    q, s = quantize_fp4(w)
    assert q.shape == (8, 32) and q.dtype == torch.int8 and s.shape == (8, 2)
    err = (dequantize_fp4(q, s) - w).abs()
    assert (err <= s.float().repeat_interleave(32, 1)).all()  # worst FP4 gap (4 -> 6) is 2 scale units


# ---------------------------------------------------------------- spellings via a tiny transformers model

_LAYER_MAP = {  # official suffix -> transformers module suffix (spec section 5.2)
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"hc_{b}_{p}": f"{b}_hc.{p}" for b in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "attn.attn_sink": "self_attn.sinks", "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight", "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight", "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight", "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    **{f"attn.{o}compressor.{a}": f"self_attn.compressor.{h}{b}"
       for o, h in (("", ""), ("indexer.", "indexer."))
       for a, b in (("wkv.weight", "kv_proj.weight"), ("wgate.weight", "gate_proj.weight"),
                    ("ape", "position_bias"), ("norm.weight", "kv_norm.weight"))},
    "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid", "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_TOP_MAP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
            "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
            "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}


def _official_from_hf(hf: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    official = {o: hf[h] for o, h in _TOP_MAP.items()}
    used = set(_TOP_MAP.values())
    for i in range(n_layers):
        p = f"model.layers.{i}."
        official.update({f"layers.{i}.{o}": hf[p + h] for o, h in _LAYER_MAP.items() if p + h in hf})
        used |= {p + h for h in _LAYER_MAP.values() if p + h in hf}
        used |= {p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"}
        gate_up, down = hf[p + "mlp.experts.gate_up_proj"], hf[p + "mlp.experts.down_proj"]
        half = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            official[f"layers.{i}.ffn.experts.{e}.w1.weight"] = gate_up[e, :half]
            official[f"layers.{i}.ffn.experts.{e}.w3.weight"] = gate_up[e, half:]
            official[f"layers.{i}.ffn.experts.{e}.w2.weight"] = down[e]
    assert used == hf.keys(), hf.keys() - used  # the map covers every transformers tensor
    return {k: v.clone() for k, v in official.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.DeepseekV4Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "compressed_sparse_attention",
                     "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=16,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
        sliding_window=16, hc_mult=2, index_n_heads=2, index_head_dim=16, index_topk=4,
        max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(cfg)
    with torch.no_grad():  # distinct random values everywhere, so any mix-up of same-shaped tensors shows
        for name, t in model.state_dict().items():
            t.copy_(torch.randint(0, 4, t.shape) if name.endswith("tid2eid") else torch.randn(t.shape))
    hf_state = model.state_dict()
    official = _official_from_hf(hf_state, cfg.num_hidden_layers)
    root = tmp_path_factory.mktemp("tiny")
    config = json.loads(cfg.to_json_string())
    save_official(official, root / "a", config)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, root / "b.safetensors")
    (root / "b").mkdir()
    (root / "b.safetensors").rename(root / "b" / "model.safetensors")
    model.save_pretrained(root / "c", max_shard_size="200KB")  # sharded, with an index
    return dict(model=model, official=official, config=config, root=root,
                expected={k: (tuple(v.shape), v.dtype) for k, v in official.items()})


def _same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_official_spelling_is_what_transformers_converts(tiny):
    model, info = type(tiny["model"]).from_pretrained(tiny["root"] / "a", output_loading_info=True)
    assert not any(info.values()), info
    _same(model.state_dict(), tiny["model"].state_dict())


def test_save_pretrained_names(tiny):
    index = json.loads((tiny["root"] / "c" / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1
    assert {"head.weight", "model.embed_tokens.weight", "model.norm.weight", "model.hc_head.hc_fn",
            "model.layers.2.attn.norm.weight", "model.layers.2.attn.compressor.norm.weight",
            "model.layers.2.hc_attn_fn", "model.layers.1.ffn.experts.3.w2.weight"} <= names


@pytest.mark.parametrize("spelling", ["a", "b", "c"])
def test_all_spellings_load_identically(tiny, spelling):
    got = load_state_dict(tiny["root"] / spelling, tiny["expected"], torch.float32)
    _same(got, tiny["official"])


def test_dtype_policy(tiny):
    got = load_state_dict(tiny["root"] / "c", tiny["expected"], torch.bfloat16)
    kept = {"hc_head_fn", "layers.2.hc_ffn_scale", "layers.3.attn.attn_sink", "layers.2.attn.compressor.ape",
            "layers.2.attn.indexer.compressor.ape", "layers.1.ffn.gate.bias"}
    assert kept <= got.keys()
    for k, t in got.items():
        fp32 = re.search(r"(^|\.)hc_|attn_sink$|\.ape$|gate\.bias$", k)
        want = torch.int64 if k.endswith("tid2eid") else torch.float32 if fp32 else torch.bfloat16
        assert (k in kept) <= bool(fp32) and t.dtype == want, k
        assert torch.equal(t, tiny["official"][k].to(want)), k


def test_quantised_sharded_checkpoint(tiny, tmp_path):
    save_official(tiny["official"], tmp_path, tiny["config"], quantize=True, shards=3)
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > len(tiny["official"])
    got = load_state_dict(tmp_path, tiny["expected"], torch.float32)
    n_fp8 = n_fp4 = 0
    for k, w in tiny["official"].items():
        if FP8_NAMES.search(k):
            n_fp8 += 1
            want = dequantize_fp8(*quantize_fp8(w))
        elif FP4_NAMES.search(k):
            n_fp4 += 1
            want = dequantize_fp4(*quantize_fp4(w))
        else:
            want = w
        assert torch.equal(got[k], want), k
    assert n_fp8 == 4 * 8 + 1 and n_fp4 == 4 * 4 * 3  # wq_a wq_b wkv wo_a wo_b + 3 shared per layer; +1 indexer

    # transformers-style scale names (.weight_scale_inv), float32 scales and float4_e2m1fn_x2 experts load the same
    alt = tmp_path / "alt"
    alt.mkdir()
    for f in tmp_path.glob("*.safetensors"):
        t = load_file(f)
        t = {k.replace(".scale", ".weight_scale_inv") if k.endswith(".scale") else k:
             v.float() if k.endswith(".scale") else v.view(torch.float4_e2m1fn_x2) if v.dtype == torch.int8 else v
             for k, v in t.items()}
        save_file(t, alt / f.name)
    (alt / "config.json").write_text((tmp_path / "config.json").read_text())  # no index: glob all files
    _same(load_state_dict(alt, tiny["expected"], torch.float32), got)


# ---------------------------------------------------------------- errors

def _small(folder, extra=None, drop=()):
    tensors = {"embed.weight": torch.randn(8, 4), "layers.0.ffn.gate.tid2eid": torch.randint(0, 4, (8, 2)),
               "layers.0.hc_attn_fn": torch.randn(6, 8), "mtp.0.enorm.weight": torch.randn(4), **(extra or {})}
    for k in drop:
        del tensors[k]
    folder.mkdir(exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items() if not k.startswith("mtp.")}


def test_small_checkpoint_loads_and_skips_mtp(tmp_path):
    expected = _small(tmp_path)
    assert load_state_dict(tmp_path, expected, torch.bfloat16).keys() == expected.keys()


def test_missing_tensor(tmp_path):
    expected = _small(tmp_path)
    expected["norm.weight"] = ((4,), torch.float32)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing .*norm\.weight"):
        load_state_dict(tmp_path, expected, torch.float32)


def test_unexpected_tensor(tmp_path):
    expected = _small(tmp_path, extra={"model.layers.0.self_attn.bogus.weight": torch.randn(2)})
    del expected["model.layers.0.self_attn.bogus.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.bogus\.weight \(stored as model\.layers\.0\."
                                              r"self_attn\.bogus\.weight in model\.safetensors\)"):
        load_state_dict(tmp_path, expected, torch.float32)


def test_duplicate_spellings(tmp_path):
    expected = _small(tmp_path, extra={"model.embed_tokens.weight": torch.randn(8, 4)})
    with pytest.raises(CheckpointError, match=r"embed\.weight: found twice"):
        load_state_dict(tmp_path, expected, torch.float32)


def test_wrong_shape(tmp_path):
    expected = _small(tmp_path)
    expected["embed.weight"] = ((8, 5), torch.float32)
    with pytest.raises(CheckpointError, match=r"^embed\.weight: expected shape \(8, 5\), checkpoint has \(8, 4\) "
                                              r"in model\.safetensors$"):
        load_state_dict(tmp_path, expected, torch.float32)


def test_wrong_dtype(tmp_path):
    expected = _small(tmp_path, extra={"layers.0.ffn.gate.tid2eid": torch.randn(8, 2)})
    expected["layers.0.ffn.gate.tid2eid"] = ((8, 2), torch.int64)
    with pytest.raises(CheckpointError, match=r"tid2eid: expected torch\.int64 .* has torch\.float32"):
        load_state_dict(tmp_path, expected, torch.float32)


def test_quantised_weight_needs_a_scale(tmp_path):
    q, s = quantize_fp8(torch.randn(8, 4))
    expected = _small(tmp_path, extra={"embed.weight": q})
    with pytest.raises(CheckpointError, match=r"embed\.weight: quantised torch\.float8_e4m3fn weight without a scale"):
        load_state_dict(tmp_path, expected, torch.float32)
    _small(tmp_path, extra={"embed.weight": q, "embed.scale": s.repeat(1, 2)})
    with pytest.raises(CheckpointError, match=r"embed\.weight: scale shape \(1, 2\)"):
        load_state_dict(tmp_path, expected, torch.float32)


def test_truncated_file(tmp_path):
    expected = _small(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"^model\.safetensors: not a readable safetensors file"):
        load_state_dict(tmp_path, expected, torch.float32)
    (tmp_path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"^model\.safetensors: "):
        load_state_dict(tmp_path, expected, torch.float32)


def test_read_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    assert read_config(tmp_path) == {"hidden_size": 64}
