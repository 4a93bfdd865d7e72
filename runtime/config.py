"""ModelConfig: a DeepSeek-V4 checkpoint's config.json, in either of its two spellings.

transformers-style configs carry `layer_types`, `compress_rates`, `mlp_layer_types` and
`rope_parameters`; the official DeepSeek configs carry `compress_ratios` (one entry per layer plus
the MTP block), `num_hash_layers`, `qk_rope_head_dim` and `rope_scaling`. Both become the same
`ModelConfig`, whose field names are config.json keys. The layer schedule always comes from the
checkpoint: a config with neither `layer_types` nor `compress_ratios` is refused rather than given
transformers' default schedule, which matches neither Flash nor Pro.

Anything the runtime cannot honour raises `ConfigError` naming the key and the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

# The attention layer types, spelled as config.json's `layer_types` spells them, and their short names
# (the engine's PrefillProgress.layer_s keys, the prefixes of runtime.timing's categories, labels).
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
SHORT = {SLIDING: "sliding", CSA: "csa", HCA: "hca"}
MLP_TYPES = ("hash_moe", "moe")
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}


class ConfigError(ValueError):
    """A config.json the runtime cannot honour; the message names the key."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    layer_types: list[str]
    mlp_layer_types: list[str]
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    compress_rates: dict[str, int] = field(default_factory=lambda: {CSA: 4, HCA: 128})
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict | None = None  # YaRN for CSA/HCA layers only: factor, original_max_position_embeddings, beta_*
    max_position_embeddings: int = 1048576
    num_key_value_heads: int = 1
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    model_type: str = "deepseek_v4"

    @property
    def csa_rate(self) -> int:
        return self.compress_rates[CSA]

    @property
    def hca_rate(self) -> int:
        return self.compress_rates[HCA]

    def rate(self, layer: int) -> int:
        """Compression rate of a layer (0 for sliding-window-only layers)."""
        t = self.layer_types[layer]
        return 0 if t == SLIDING else self.compress_rates[t]

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Parse and validate; anything malformed (a missing nested key, a value of the wrong type)
        raises ConfigError too, never a bare KeyError / TypeError."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
        try:
            return cls._from_dict(dict(d))
        except ConfigError:
            raise
        except KeyError as e:
            raise ConfigError(f"{e.args[0]}: missing from config.json (required here)") from None
        except (TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ConfigError(f"config.json: malformed value ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_dict(cls, d: dict) -> "ModelConfig":
        mt = d.get("model_type", "deepseek_v4")
        if mt != "deepseek_v4":
            raise ConfigError(f"model_type: expected 'deepseek_v4', got {mt!r} (this runtime only runs DeepSeek-V4)")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "q_lora_rank", "o_groups", "o_lora_rank", "moe_intermediate_size", "n_routed_experts",
                    "num_experts_per_tok"):
            if d.get(key) is None:
                raise ConfigError(f"{key}: missing from config.json (required)")
            if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 1:
                raise ConfigError(f"{key}: expected a positive integer, got {d[key]!r}")
        n = d["num_hidden_layers"]
        rates = dict(d.get("compress_rates") or {CSA: 4, HCA: 128})
        for key, t in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
            if key in d:
                if "compress_rates" in d and t in rates and rates[t] != d[key]:
                    raise ConfigError(f"{key} / compress_rates: contradictory ({key}={d[key]!r} but "
                                      f"compress_rates.{t}={rates[t]!r})")
                rates[t] = d[key]

        # Attention schedule: transformers' layer_types, else official compress_ratios (L + MTP entries).
        from_ratios = None
        if d.get("compress_ratios") is not None:
            ratios = list(d["compress_ratios"])
            if len(ratios) < n:
                raise ConfigError(f"compress_ratios: {len(ratios)} entries for {n} layers")
            bad = [r for r in ratios[:n] if r not in _RATIO_TO_TYPE]
            if bad:
                raise ConfigError(f"compress_ratios: unsupported ratio(s) {bad}; DeepSeek-V4 uses 0, 4 and 128")
            from_ratios = [_RATIO_TO_TYPE[r] for r in ratios[:n]]
            for t, r in ((CSA, 4), (HCA, 128)):  # the ratios name the rates: compress_rates may not say otherwise
                if t in from_ratios and rates.get(t, r) != r:
                    raise ConfigError(f"compress_ratios / compress_rates: contradictory (compress_ratios uses {r} "
                                      f"for {t}, compress_rates.{t} is {rates[t]!r})")
        if d.get("layer_types") is not None:
            layer_types = list(d["layer_types"])
            if from_ratios is not None and layer_types[:n] != from_ratios:
                i = next(i for i, (a, b) in enumerate(zip(layer_types + [None] * n, from_ratios)) if a != b)
                raise ConfigError(f"layer_types / compress_ratios: contradictory (layer {i} is "
                                  f"{layer_types[i] if i < len(layer_types) else 'missing'!r} in layer_types but "
                                  f"{from_ratios[i]!r} by compress_ratios)")
        elif from_ratios is not None:
            layer_types = from_ratios
        else:
            raise ConfigError("layer_types / compress_ratios: the config has neither; the layer schedule must "
                              "come from the checkpoint")
        layer_types = layer_types[:n]

        if d.get("mlp_layer_types") is not None:
            mlp_types = list(d["mlp_layer_types"])[:n]
            n_hash = d.get("num_hash_layers")
            if n_hash is not None and mlp_types != ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash):
                raise ConfigError(f"mlp_layer_types / num_hash_layers: contradictory (num_hash_layers={n_hash!r} "
                                  f"but mlp_layer_types has {mlp_types.count('hash_moe')} hash_moe layer(s))")
        else:
            n_hash = d.get("num_hash_layers", 3)
            mlp_types = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)

        # Rotary: qk_rope_head_dim (official) or partial_rotary_factor (transformers).
        rope_theta = d.get("rope_theta", 10000.0)
        compress_theta = d.get("compress_rope_theta", 160000.0)
        rope_scaling = d.get("rope_scaling")
        rp = d.get("rope_parameters")
        prf = d.get("partial_rotary_factor")
        if isinstance(rp, dict) and isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
            rope_theta = rp["main"].get("rope_theta", rope_theta)
            compress_theta = rp["compress"].get("rope_theta", compress_theta)
            prf = rp["compress"].get("partial_rotary_factor", prf)
            if rp["main"].get("rope_type", "default") != "default":
                raise ConfigError("rope_parameters.main.rope_type: only 'default' is used by DeepSeek-V4")
            comp = rp["compress"]
            rope_scaling = comp if comp.get("rope_type", comp.get("type", "default")) != "default" else None
        elif isinstance(rp, dict) and rp.get("rope_type", rp.get("type", "default")) != "default":
            rope_scaling = rp  # flat transformers-style rope_parameters holding the YaRN block
            rope_theta = rp.get("rope_theta", rope_theta)
        if d.get("qk_rope_head_dim") is not None:
            rope_dim = d["qk_rope_head_dim"]
            if prf is not None and d["head_dim"] * prf != rope_dim:
                raise ConfigError(f"qk_rope_head_dim / partial_rotary_factor: contradictory (qk_rope_head_dim="
                                  f"{rope_dim!r} but head_dim {d['head_dim']} x partial_rotary_factor {prf!r} = "
                                  f"{d['head_dim'] * prf:g})")
        elif prf is not None:
            rope_dim = int(d["head_dim"] * prf)
        else:
            rope_dim = 64
        if rope_scaling is not None:
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rtype not in ("yarn", "default", None):
                raise ConfigError(f"rope_scaling.type: {rtype!r} is not supported (DeepSeek-V4 uses 'yarn')")
            rope_scaling = None if rtype in ("default", None) else {
                "factor": float(rope_scaling["factor"]),
                "original_max_position_embeddings": int(rope_scaling["original_max_position_embeddings"]),
                "beta_fast": float(rope_scaling.get("beta_fast") or 32),
                "beta_slow": float(rope_scaling.get("beta_slow") or 1),
            }

        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw.update(layer_types=layer_types, mlp_layer_types=mlp_types, compress_rates=rates,
                  qk_rope_head_dim=rope_dim, rope_theta=rope_theta, compress_rope_theta=compress_theta,
                  rope_scaling=rope_scaling)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        n = self.num_hidden_layers
        for key, vals, allowed in (("layer_types", self.layer_types, LAYER_TYPES),
                                   ("mlp_layer_types", self.mlp_layer_types, MLP_TYPES)):
            if len(vals) != n:
                raise ConfigError(f"{key}: {len(vals)} entries for num_hidden_layers={n}")
            bad = sorted({v for v in vals if v not in allowed})
            if bad:
                raise ConfigError(f"{key}: unknown value(s) {bad}; expected one of {list(allowed)}")
        if self.num_key_value_heads != 1:
            raise ConfigError(f"num_key_value_heads: DeepSeek-V4 shares one KV head, got {self.num_key_value_heads}")
        if self.num_attention_heads % self.o_groups:
            raise ConfigError(f"o_groups: {self.o_groups} does not divide num_attention_heads={self.num_attention_heads}")
        if not (0 < self.qk_rope_head_dim <= self.head_dim) or self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim: {self.qk_rope_head_dim} must be even and within head_dim={self.head_dim}")
        if CSA in self.layer_types and (self.index_head_dim < self.qk_rope_head_dim or self.index_topk < 1):
            raise ConfigError(f"index_head_dim/index_topk: index_head_dim {self.index_head_dim} must hold the "
                              f"{self.qk_rope_head_dim} rope dims and index_topk must be positive")
        for t in (CSA, HCA):
            if t in self.layer_types and self.compress_rates.get(t, 0) < 1:
                raise ConfigError(f"compress_rates.{t}: must be a positive integer, got {self.compress_rates.get(t)}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok: {self.num_experts_per_tok} > n_routed_experts={self.n_routed_experts}")
        if self.n_shared_experts != 1:
            raise ConfigError(f"n_shared_experts: only 1 shared expert is supported, got {self.n_shared_experts}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"scoring_func: {self.scoring_func!r} is not one of {list(SCORING_FUNCS)}")
        if self.sliding_window < 1 or self.hc_mult < 1 or self.hc_sinkhorn_iters < 1:
            raise ConfigError("sliding_window/hc_mult/hc_sinkhorn_iters: must be positive")

    def yarn_ramp_range(self) -> tuple[float, float] | None:
        """YaRN's (low, high) pair-index range for the compress rope, or None without YaRN."""
        ys = self.rope_scaling
        if ys is None:
            return None
        r, base = self.qk_rope_head_dim, self.compress_rope_theta

        def corr(nrot: float) -> float:
            return r * math.log(ys["original_max_position_embeddings"] / (nrot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(ys["beta_fast"])), 0)
        high = min(math.ceil(corr(ys["beta_slow"])), r - 1)
        return float(low), float(high) + (0.001 if low == high else 0.0)
