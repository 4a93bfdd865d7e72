"""Test helper: random-weight transformers DeepseekV4ForCausalLM models (the logits oracle).

transformers is a test dependency only. Configs are tiny but keep every V4 part: sliding, CSA and
HCA layers, hash- and score-routed MoE, mHC, YaRN, grouped output projection.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

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


def random_hf_model(cfg: dict, seed: int = 0):
    """A DeepseekV4ForCausalLM with every parameter random (HF init leaves some at 0 / identity)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg)).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "position_bias" in name or name.endswith((".base", "hc_base", ".scale", "hc_scale")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                n_exp = cfg["n_routed_experts"]
                rows = torch.stack([torch.randperm(n_exp, generator=g)[: b.shape[1]] for _ in range(b.shape[0])])
                b.copy_(rows)
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model
