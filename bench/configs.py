"""Model presets for the benchmark, as transformers-style config dicts.

The same dict is read by `runtime.config.ModelConfig.from_dict` and, with --compare, by
transformers' `DeepseekV4Config`, so both runtimes see the same architecture. `--set key=value`
overrides any key (the value is parsed as JSON when it can be).
"""

from __future__ import annotations

import copy
import json

from runtime.config import CSA, HCA, SLIDING as SL

_YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
         "beta_fast": 32, "beta_slow": 1}

PRESETS: dict[str, dict] = {
    # The "small config of about 5M parameters" (5.9M: 4.2M of them are the untied 8192 x 256
    # embedding and head): the shape of the planned default model "ds4-tiny" (see
    # ../shared/design/default_model.md), with the CSA layer last so a long prefill only needs its
    # outputs at the kept positions.
    "tiny5m": dict(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=64, partial_rotary_factor=0.25, q_lora_rank=128, o_groups=2, o_lora_rank=64,
        sliding_window=128, layer_types=[SL, SL, HCA, CSA], compress_rates={CSA: 4, HCA: 128},
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], moe_intermediate_size=64, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, index_n_heads=4, index_head_dim=32, index_topk=64,
        hc_mult=2, hc_sinkhorn_iters=20, max_position_embeddings=1048576,
        rope_theta=10000.0, compress_rope_theta=160000.0, rope_parameters=dict(_YARN),
        routed_scaling_factor=1.5, swiglu_limit=10.0, tie_word_embeddings=False,
    ),
    # A very small model for the harness's own smoke test (seconds at 1k tokens).
    "micro": dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=16,
        sliding_window=16, layer_types=[SL, SL, HCA, CSA], compress_rates={CSA: 4, HCA: 32},
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, index_n_heads=2, index_head_dim=16, index_topk=16,
        hc_mult=2, hc_sinkhorn_iters=5, max_position_embeddings=65536,
        rope_theta=10000.0, compress_rope_theta=160000.0, rope_parameters=dict(_YARN, original_max_position_embeddings=4096),
        routed_scaling_factor=1.5, swiglu_limit=10.0, tie_word_embeddings=False,
    ),
    # Issue 6's GPU line: V4-Flash widths (hidden 4096, 64 heads x 512, rope 64, q rank 1024, 8 output
    # groups, indexer 64 x 128 top-512, hc_mult 4, real vocab) with few layers and experts. ~1.5B params.
    "flash-width": dict(
        vocab_size=129280, hidden_size=4096, num_hidden_layers=4, num_attention_heads=64, num_key_value_heads=1,
        head_dim=512, partial_rotary_factor=0.125, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
        sliding_window=128, layer_types=[SL, CSA, HCA, CSA], compress_rates={CSA: 4, HCA: 128},
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], moe_intermediate_size=2048, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, index_n_heads=64, index_head_dim=128, index_topk=512,
        hc_mult=4, hc_sinkhorn_iters=20, max_position_embeddings=1048576,
        rope_theta=10000.0, compress_rope_theta=160000.0, rope_parameters=dict(_YARN),
        routed_scaling_factor=1.5, swiglu_limit=10.0, tie_word_embeddings=False,
    ),
}
DEFAULT_PRESET = "tiny5m"


def parse_overrides(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def preset(name: str, overrides: dict | None = None) -> dict:
    if name not in PRESETS:
        raise ValueError(f"--config: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name])
    cfg.update(overrides or {})
    return cfg
