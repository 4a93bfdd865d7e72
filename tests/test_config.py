"""config.json in both spellings -> the same ModelConfig; configs the runtime cannot honour fail by key."""

import json

import pytest
import torch

from runtime.config import CSA, HCA, SLIDING, ConfigError, ModelConfig
from runtime.layers import rope_inv_freq

FLASH_OFFICIAL = {  # the shape of DeepSeek-V4-Flash's official config.json (trimmed to what matters)
    "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64,
    "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8,
    "o_lora_rank": 1024, "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [0],
    "compress_rope_theta": 160000, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "n_routed_experts": 256,
    "num_experts_per_tok": 6, "n_shared_experts": 1, "moe_intermediate_size": 2048, "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5, "num_hash_layers": 3, "swiglu_limit": 10.0, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
    "max_position_embeddings": 1048576, "model_type": "deepseek_v4",
}


def test_official_flash_schedule():
    c = ModelConfig.from_dict(FLASH_OFFICIAL)
    assert c.layer_types[:2] == [SLIDING, SLIDING]
    assert c.layer_types[2::2] == [CSA] * 21 and c.layer_types[3::2] == [HCA] * 20
    assert c.mlp_layer_types == ["hash_moe"] * 3 + ["moe"] * 40
    assert c.qk_rope_head_dim == 64 and c.rope_scaling["factor"] == 16.0


def test_yarn_range_matches_spec():
    """Spec §3.4: for base 160000, r = 64 the ramp runs over pair indices 15..25."""
    c = ModelConfig.from_dict(FLASH_OFFICIAL)
    assert c.yarn_ramp_range() == (15.0, 25.0)
    inv = rope_inv_freq(c, compress=True)
    plain = 1.0 / 160000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    torch.testing.assert_close(inv[:16], plain[:16])  # high frequencies untouched
    torch.testing.assert_close(inv[25:], plain[25:] / 16)  # low frequencies fully interpolated
    assert ((inv[16:25] < plain[16:25]) & (inv[16:25] > plain[16:25] / 16)).all()
    main = rope_inv_freq(c, compress=False)
    torch.testing.assert_close(main, 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))


def test_both_spellings_agree(tmp_path):
    """transformers' own DeepseekV4Config, saved, parses to the same ModelConfig as the official form."""
    from transformers import DeepseekV4Config

    small = dict(FLASH_OFFICIAL, num_hidden_layers=5, compress_ratios=[0, 0, 4, 128, 4, 0], vocab_size=100)
    hf = DeepseekV4Config(**small)
    hf.save_pretrained(tmp_path)
    a = ModelConfig.from_dict(small)
    b = ModelConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert a == b


def test_pro_schedule_from_layer_types():
    d = dict(FLASH_OFFICIAL, num_hidden_layers=4)
    d.pop("compress_ratios")
    d["layer_types"] = [HCA, HCA, CSA, HCA]
    assert ModelConfig.from_dict(d).layer_types == [HCA, HCA, CSA, HCA]


@pytest.mark.parametrize("change,key", [
    ({"model_type": "llama"}, "model_type"),
    ({"compress_ratios": None}, "layer_types / compress_ratios"),
    ({"compress_ratios": [0, 8] + [4] * 42}, "compress_ratios"),
    ({"compress_ratios": [0, 4]}, "compress_ratios"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"o_groups": 7}, "o_groups"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope_scaling"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"layer_types": [SLIDING] * 42 + ["global"]}, "layer_types"),
    # keys that contradict each other: refused, naming both, rather than one silently winning
    ({"layer_types": [SLIDING] * 43}, "layer_types / compress_ratios: contradictory"),
    ({"compress_rates": {CSA: 8, HCA: 128}}, "compress_ratios / compress_rates: contradictory"),
    ({"compress_rates": {CSA: 4, HCA: 128}, "compress_rate_hca": 64}, "compress_rate_hca / compress_rates"),
    ({"mlp_layer_types": ["moe"] * 43}, "mlp_layer_types / num_hash_layers: contradictory"),
    ({"partial_rotary_factor": 0.25}, "qk_rope_head_dim / partial_rotary_factor: contradictory"),
    # malformed: a missing nested key or a value of the wrong type is a ConfigError too, not a crash
    ({"rope_scaling": {"type": "yarn"}}, "factor: missing"),
    ({"num_hidden_layers": "43"}, "num_hidden_layers: expected a positive integer"),
    ({"hidden_size": -1}, "hidden_size: expected a positive integer"),
    ({"compress_ratios": 4}, "config.json: malformed value"),
])
def test_errors_name_the_key(change, key):
    d = dict(FLASH_OFFICIAL, **change)
    if d.get("hidden_size") is None:
        d.pop("hidden_size")
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    assert str(e.value).startswith(key)


def test_agreeing_duplicates_are_fine():
    """Both spellings of the same fact, agreeing (what transformers writes next to the official keys)."""
    d = dict(FLASH_OFFICIAL, layer_types=ModelConfig.from_dict(FLASH_OFFICIAL).layer_types,
             partial_rotary_factor=0.125, compress_rates={CSA: 4, HCA: 128}, compress_rate_csa=4,
             mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 40)
    assert ModelConfig.from_dict(d) == ModelConfig.from_dict(FLASH_OFFICIAL)
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.from_dict([FLASH_OFFICIAL])
