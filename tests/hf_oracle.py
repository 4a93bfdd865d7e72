"""Test helper: random-weight transformers DeepseekV4ForCausalLM models (the logits oracle).

transformers is a test dependency only. Configs are tiny but keep every V4 part: sliding, CSA and
HCA layers, hash- and score-routed MoE, mHC, YaRN, grouped output projection. `random_hf_model` (every
parameter random) comes from bench/compare.py, so the tests and `python -m bench --compare` share it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.compare import random_hf_model  # noqa: F401  re-exported: the same random weights as bench --compare
from runtime.config import CSA, HCA, SLIDING as SL  # config.json's layer_types spelling, transformers' too


def tiny_config(**over) -> dict:
    cfg = dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, q_lora_rank=12, o_groups=2, o_lora_rank=8, sliding_window=8,
        layer_types=[SL, CSA, HCA, CSA], compress_rates={CSA: 4, HCA: 16},
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, index_n_heads=2, index_head_dim=12, index_topk=64,
        partial_rotary_factor=0.5, hc_mult=2, hc_sinkhorn_iters=5, max_position_embeddings=4096,
        rope_theta=10000.0, compress_rope_theta=160000.0,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1},
        routed_scaling_factor=1.5, swiglu_limit=10.0, tie_word_embeddings=False,
    )
    cfg.update(over)
    return cfg

