"""Memory plan for serving a DeepSeek-V4 checkpoint on W GPUs: will it fit, and what would.

Per rank it adds up
- the weights as the checkpoint stores them: FP8 e4m3 with one ue8m0 byte per 128x128 block (attention
  linears, the indexer's wq_b, shared experts), routed experts in FP4 (half a byte per element, one ue8m0
  byte per 32), the other weights at the model dtype (`--dtype`: embed, head, norms, compressor and indexer
  projections, router) except those the runtime keeps in fp32 (mHC, attention sinks, `ape`, router bias);
  under Longlens's sharding (`SPLITS`): heads (wq_b, attn_sink), output groups (wo_a) and wo_b's input
  columns split W ways, embed and head by vocabulary rows, each rank 1/W of the routed experts, and
  everything else -- the whole lightning indexer included, unlike the official code -- on every rank;
- the cache of every session: heads are split but the one K=V head (MQA) is not, so every rank holds
  every session's whole cache (the same arithmetic as runtime/cache.py, which runtime/budget.py uses too);
- a workspace: one prefill chunk's activations, the attention's score scratch per query block, and a
  fixed allowance for the CUDA context and NCCL (named constants below).

`check_world_size` is the divisibility rule every sharded load obeys; `plan_or_refuse` is what a torchrun
launch calls before loading anything. Pure: the standard library and runtime.config only (no torch).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import CSA, HCA, ConfigError, ModelConfig

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
PRESETS = {"flash": "DeepSeek-V4-Flash", "pro": "DeepSeek-V4-Pro"}

GiB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}

# Storage formats (spec §6): FP8 e4m3 + one ue8m0 scale byte per 128x128 block; FP4 e2m1 packed two per
# byte + one ue8m0 byte per 1x32 block.
FP8_BLOCK = 128
FP4_BLOCK = 32
SCALE_BYTES = 1
FP8_LINEARS = re.compile(r"\.attn\.(indexer\.)?(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|\.shared_experts\.w[123]\.weight$")
EXPERTS = re.compile(r"\.ffn\.experts\.(\d+)\.w[123]\.weight$")
# what load_model keeps in fp32 whatever --dtype (checkpoint.KEEP_FP32, which imports torch), and the hash table
FP32 = re.compile(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$|\.attn_sink$|\.ape$|\.gate\.bias$")
INT64 = re.compile(r"\.gate\.tid2eid$")

# Longlens's tensor parallelism (runtime/parallel.py): the dimension each of these is split along, W ways; the
# routed experts go whole to one rank each; everything else is replicated.
SPLITS = ((re.compile(r"\.attn\.wq_b\.weight$|\.attn\.attn_sink$"), 0),  # by head
          (re.compile(r"\.attn\.wo_a\.weight$"), 0),  # by output group
          (re.compile(r"\.attn\.wo_b\.weight$"), 1),  # input columns; all-reduce after it
          (re.compile(r"^(embed|head)\.weight$"), 0))  # by vocabulary row

# Workspace. Attention scores run per query block (runtime/attention.py, Attention._sparse): a block holds
# at most SCORE_BUDGET bytes of scratch, at most QUERY_BLOCK queries, and at least one query whatever its size.
SCORE_BUDGET = 256 << 20  # Attention.score_budget
QUERY_BLOCK = 128  # Attention.query_block
SCORE_COPIES = 2  # a block's logits and their softmax (concatenated with the sink) are alive together
STREAM_FP32_COPIES = 3  # of a chunk's mHC streams [chunk, hc_mult, hidden]: the streams, mHC's fp32 flat + normed
HEAD_COPIES = 4  # of a chunk's local-head tensors [chunk, heads/W, head_dim]: wq_b's output, q normed, q rotated, o
HIDDEN_FP32_COPIES = 8  # of [chunk, hidden] in fp32: attention/MoE inputs and outputs, compressor projections, router
DEQUANT_COPIES = 2  # runtime/qlinear.py expands a weight whole per call: the gathered values, then scaled
CUDA_CONTEXT = 1 * GiB  # CUDA context, cuBLAS workspaces and loaded kernels: ~0.5-1 GiB per Hopper GPU
NCCL_BUFFERS = 512 << 20  # NCCL channel buffers (4 MiB NCCL_BUFFSIZE x channels x peers) and its streams, when W > 1
DEFAULT_CHUNK = 2048  # the engine's prefill chunk (runtime/engine.py)

GROUPS = ("attention", "indexer", "compressors", "routed experts", "shared experts", "router", "embed + head",
          "norms + mHC")
CACHE_PARTS = ("window", "csa_entries", "indexer_keys", "hca_entries", "buffers")  # Cache.nbytes()'s keys
CACHE_LABELS = {"window": "sliding windows", "csa_entries": "CSA entries", "indexer_keys": "indexer keys",
                "hca_entries": "HCA entries", "buffers": "compressor buffers"}


class DoesNotFit(RuntimeError):
    """plan_or_refuse: the plan does not fit; `plan` and `table` say by how much and what would."""

    code = "does_not_fit"

    def __init__(self, plan: "Plan"):
        super().__init__(plan.table())
        self.plan, self.table = plan, plan.table()


# ------------------------------------------------------------------------------------------------ configs
def preset(name: str) -> dict:
    """The config.json of a preset ("flash", "pro"): the released checkpoints' values (spec §2.1)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: {name!r} is not one of {sorted(PRESETS)}")
    return json.loads((PRESETS_DIR / f"{name}.json").read_text())


def formats(raw: dict) -> tuple[str, str]:
    """(linear format, routed-expert format) a config.json declares: "fp8"/"fp4" for the released checkpoints,
    "float" for unquantised ones. FP8 checkpoints ship FP4 experts unless `expert_dtype` says fp8 (-Base)."""
    q = raw.get("quantization_config") or {}
    if q.get("quant_method") != "fp8":
        return "float", "float"
    experts = str(q.get("expert_dtype", raw.get("expert_dtype", "fp4"))).lower()
    return "fp8", "fp8" if experts == "fp8" else "fp4"


# ------------------------------------------------------------------------------------------------ world size
def _split_rules(config: ModelConfig) -> list[tuple[str, int, str]]:
    return [("num_attention_heads", config.num_attention_heads, "wq_b and attn_sink are split by head"),
            ("o_groups", config.o_groups, "wo_a is split by output group"),
            ("n_routed_experts", config.n_routed_experts, "each rank holds an equal share of the routed experts"),
            ("vocab_size", config.vocab_size, "embed and head are split by vocabulary row")]


def valid_world_sizes(config: ModelConfig, up_to: int = 1024) -> list[int]:
    return [w for w in range(1, up_to + 1) if all(n % w == 0 for _, n, _ in _split_rules(config))]


def check_world_size(config: ModelConfig, world_size: int) -> None:
    """Raise ConfigError unless `world_size` ranks can split this model (naming each broken constraint)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
    broken = [f"world size {world_size} does not divide {key}={n} ({why})"
              for key, n, why in _split_rules(config) if n % world_size]
    if broken:
        ok = ", ".join(map(str, valid_world_sizes(config, max(world_size, config.o_groups))))
        raise ConfigError("; ".join(broken) + f". Valid world sizes for this model: {ok}")


# ------------------------------------------------------------------------------------------------ weights
def tensors(config: ModelConfig):
    """(name, shape) of every tensor the runtime's model holds (its state_dict), in official naming."""
    c, n, D = config, config.hc_mult, config.hidden_size
    H, d, I = c.num_attention_heads, c.head_dim, c.moe_intermediate_size
    yield "embed.weight", (c.vocab_size, D)
    yield "head.weight", (c.vocab_size, D)
    yield "norm.weight", (D,)
    yield from (("hc_head_fn", (n, n * D)), ("hc_head_base", (n,)), ("hc_head_scale", (1,)))
    for i, t in enumerate(c.layer_types):
        p = f"layers.{i}."
        for site in ("attn", "ffn"):
            yield f"{p}hc_{site}_fn", ((2 + n) * n, n * D)
            yield f"{p}hc_{site}_base", ((2 + n) * n,)
            yield f"{p}hc_{site}_scale", (3,)
            yield f"{p}{site}_norm.weight", (D,)
        a = p + "attn."
        yield from ((a + "attn_sink", (H,)), (a + "wq_a.weight", (c.q_lora_rank, D)),
                    (a + "q_norm.weight", (c.q_lora_rank,)), (a + "wq_b.weight", (H * d, c.q_lora_rank)),
                    (a + "wkv.weight", (d, D)), (a + "kv_norm.weight", (d,)),
                    (a + "wo_a.weight", (c.o_groups * c.o_lora_rank, H * d // c.o_groups)),
                    (a + "wo_b.weight", (D, c.o_groups * c.o_lora_rank)))
        if t != "sliding_attention":
            yield from _compressor(a + "compressor.", D, d, c.compress_rates[t], t == CSA)
        if t == CSA:
            yield a + "indexer.wq_b.weight", (c.index_n_heads * c.index_head_dim, c.q_lora_rank)
            yield a + "indexer.weights_proj.weight", (c.index_n_heads, D)
            yield from _compressor(a + "indexer.compressor.", D, c.index_head_dim, c.csa_rate, True)
        f = p + "ffn."
        yield f + "gate.weight", (c.n_routed_experts, D)
        if c.mlp_layer_types[i] == "hash_moe":
            yield f + "gate.tid2eid", (c.vocab_size, c.num_experts_per_tok)
        else:
            yield f + "gate.bias", (c.n_routed_experts,)
        for e in range(c.n_routed_experts):
            yield from ((f"{f}experts.{e}.w1.weight", (I, D)), (f"{f}experts.{e}.w2.weight", (D, I)),
                        (f"{f}experts.{e}.w3.weight", (I, D)))
        yield from ((f + "shared_experts.w1.weight", (I, D)), (f + "shared_experts.w2.weight", (D, I)),
                    (f + "shared_experts.w3.weight", (I, D)))


def _compressor(p: str, D: int, dim: int, rate: int, overlap: bool):
    c = 2 if overlap else 1
    yield from ((p + "wkv.weight", (c * dim, D)), (p + "wgate.weight", (c * dim, D)), (p + "ape", (rate, c * dim)),
                (p + "norm.weight", (dim,)))


def group_of(name: str) -> str:
    if ".indexer." in name:
        return "indexer"
    if ".compressor." in name:
        return "compressors"
    if re.search(r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$", name):
        return "attention"
    if EXPERTS.search(name):
        return "routed experts"
    if ".shared_experts." in name:
        return "shared experts"
    if ".gate." in name:
        return "router"
    if name in ("embed.weight", "head.weight"):
        return "embed + head"
    return "norms + mHC"  # norms, mHC parameters, attention sinks


def local_shape(name: str, shape: tuple[int, ...], world_size: int) -> list[int]:
    shape = list(shape)
    for pattern, dim in SPLITS:
        if pattern.search(name):
            shape[dim] //= world_size
            break
    return shape


def quantized_format(name: str, linear_format: str = "fp8", expert_format: str = "fp4") -> str | None:
    """"fp8" / "fp4" where the checkpoint stores this tensor quantised, else None."""
    fmt = expert_format if EXPERTS.search(name) else linear_format if FP8_LINEARS.search(name) else None
    return fmt if fmt in ("fp8", "fp4") else None


def tensor_bytes(name: str, shape: tuple[int, ...], world_size: int, dtype_bytes: int, n_experts: int,
                 linear_format: str = "fp8", expert_format: str = "fp4", rank: int = 0) -> int:
    """Bytes of this tensor on `rank` of `world_size` (0 for another rank's expert); rank r holds experts
    [r * n_experts / W, (r + 1) * n_experts / W)."""
    m = EXPERTS.search(name)
    if m and int(m.group(1)) // (n_experts // world_size) != rank:
        return 0
    shape = local_shape(name, shape, world_size)
    numel = math.prod(shape)
    fmt = quantized_format(name, linear_format, expert_format)
    if fmt == "fp8":
        return numel + math.ceil(shape[0] / FP8_BLOCK) * math.ceil(shape[1] / FP8_BLOCK) * SCALE_BYTES
    if fmt == "fp4":
        return numel // 2 + shape[0] * math.ceil(shape[1] / FP4_BLOCK) * SCALE_BYTES
    if FP32.search(name):
        return numel * 4
    if INT64.search(name):
        return numel * 8
    return numel * dtype_bytes


def weight_bytes(config: ModelConfig, world_size: int = 1, dtype: str = "bfloat16", linear_format: str = "fp8",
                 expert_format: str = "fp4") -> dict[str, int]:
    """Bytes of rank 0's weights by group (GROUPS); every rank holds the same amount."""
    check_world_size(config, world_size)
    out = dict.fromkeys(GROUPS, 0)
    el, E = DTYPE_BYTES[dtype], config.n_routed_experts
    for name, shape in tensors(config):
        m = EXPERTS.search(name)
        if m and m.group(1) != "0":  # every expert is expert 0's size: counted once per local expert below
            continue
        n = tensor_bytes(name, shape, world_size, el, E, linear_format, expert_format)
        out[group_of(name)] += n * (E // world_size if m else 1)
    return out


# ------------------------------------------------------------------------------------------------ cache
def cache_bytes_per_token(config: ModelConfig, el: int, index_el: int | None = None) -> float:
    """Cache growth per context token: CSA entries + indexer keys per csa_rate tokens, HCA entries per hca_rate."""
    iel = el if index_el is None else index_el
    per = 0.0
    for t in config.layer_types:
        if t == CSA:
            per += (config.head_dim * el + config.index_head_dim * iel) / config.csa_rate
        elif t == HCA:
            per += config.head_dim * el / config.hca_rate
    return per


def fixed_cache_bytes(config: ModelConfig, el: int) -> int:
    """Bytes that do not grow: the sliding windows plus the pooling buffers (an upper bound, fp32 buffers)."""
    parts = cache_parts(config, 0, el)
    return parts["window"] + parts["buffers"]


def cache_parts(config: ModelConfig, tokens: int, el: int, index_el: int | None = None) -> dict[str, int]:
    """One session's cache at `tokens` by component (Cache.nbytes()'s keys; windows at their full size)."""
    c, iel = config, el if index_el is None else index_el
    out = dict.fromkeys(CACHE_PARTS, 0)
    out["window"] = c.num_hidden_layers * (c.sliding_window - 1) * c.head_dim * el
    for t in c.layer_types:
        if t == CSA:
            out["csa_entries"] += int(tokens * c.head_dim * el / c.csa_rate)
            out["indexer_keys"] += int(tokens * c.index_head_dim * iel / c.csa_rate)
            # kv and index compressors, overlapping (2x features): buffered tokens + the previous window
            out["buffers"] += 4 * 3 * c.csa_rate * (c.head_dim + c.index_head_dim) * 4
        elif t == HCA:
            out["hca_entries"] += int(tokens * c.head_dim * el / c.hca_rate)
            out["buffers"] += 2 * c.hca_rate * c.head_dim * 4
    return out


# ------------------------------------------------------------------------------------------------ workspace
def score_scratch(config: ModelConfig, context: int, world_size: int = 1, chunk: int = DEFAULT_CHUNK) -> int:
    """Bytes of one query block's attention scratch at `context` tokens, as Attention._sparse sizes its blocks."""
    c = config
    H = c.num_attention_heads // world_size
    per_query = H * (c.sliding_window + 2 * chunk) * 4  # window logits
    if CSA in c.layer_types:
        per_query = max(per_query, c.index_n_heads * (context // c.csa_rate) * 4 * 2,
                        H * c.index_topk * (c.head_dim + 8) * 4)
    if HCA in c.layer_types:
        per_query = max(per_query, H * (context // c.hca_rate) * 4 * 2)
    block = max(1, min(chunk, QUERY_BLOCK, SCORE_BUDGET // per_query))
    return block * per_query


def dequant_scratch(config: ModelConfig, world_size: int = 1, dtype: str = "bfloat16", linear_format: str = "fp8",
                    expert_format: str = "fp4") -> int:
    """Scratch for the largest quantised weight of this rank expanded to `dtype`: weights kept as stored are
    dequantised one at a time, just before their matmul (runtime/qlinear.py)."""
    most = 0
    for name, shape in tensors(config):
        m = EXPERTS.search(name)
        if (m and m.group(1) != "0") or quantized_format(name, linear_format, expert_format) is None:
            continue
        most = max(most, math.prod(local_shape(name, shape, world_size)))
    return DEQUANT_COPIES * most * DTYPE_BYTES[dtype]


def workspace_parts(config: ModelConfig, context: int, world_size: int = 1, dtype: str = "bfloat16",
                    chunk: int = DEFAULT_CHUNK, linear_format: str = "fp8",
                    expert_format: str = "fp4") -> dict[str, int]:
    c, el = config, DTYPE_BYTES[dtype]
    acts = chunk * (STREAM_FP32_COPIES * c.hc_mult * c.hidden_size * 4
                    + HEAD_COPIES * (c.num_attention_heads // world_size) * c.head_dim * el
                    + HIDDEN_FP32_COPIES * c.hidden_size * 4)
    return {"prefill activations": acts,
            "attention scores": SCORE_COPIES * score_scratch(c, context, world_size, chunk),
            "dequantised weight": dequant_scratch(c, world_size, dtype, linear_format, expert_format),
            "CUDA context": CUDA_CONTEXT,
            "NCCL buffers": NCCL_BUFFERS if world_size > 1 else 0}


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    name: str
    world_size: int
    gpu_memory: int
    context: int
    sessions: int
    dtype: str
    index_dtype: str
    chunk: int
    linear_format: str
    expert_format: str
    weights: dict[str, int]
    cache: dict[str, int]  # one session
    workspace: dict[str, int]
    per_token: float  # cache bytes per context token, one session
    fixed: int  # cache bytes that do not grow, one session
    max_context: int  # the model's
    experts: int  # routed experts per layer
    fitting_world_size: int | None = None  # when this does not fit: the smallest valid world size that would
    notes: list[str] = field(default_factory=list)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def session_bytes(self) -> int:
        return sum(self.cache.values())

    @property
    def workspace_total(self) -> int:
        return sum(self.workspace.values())

    @property
    def total(self) -> int:
        return self.weights_total + self.sessions * self.session_bytes + self.workspace_total

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    @property
    def for_caches(self) -> int:
        """Bytes per rank left for session caches once weights and workspace are in."""
        return self.gpu_memory - self.weights_total - self.workspace_total

    @property
    def sessions_that_fit(self) -> int:
        return max(0, self.for_caches // self.session_bytes)

    @property
    def context_that_fits(self) -> int:
        """The longest context each of `sessions` sessions can hold (0: not even an empty one)."""
        per_session = self.for_caches / self.sessions - self.fixed
        return max(0, min(self.max_context, int(per_session / self.per_token))) if per_session > 0 else 0

    def to_dict(self) -> dict:
        return {"model": self.name, "world_size": self.world_size, "gpu_memory": self.gpu_memory,
                "context": self.context, "sessions": self.sessions, "dtype": self.dtype,
                "index_dtype": self.index_dtype, "chunk": self.chunk,
                "formats": {"linears": self.linear_format, "routed_experts": self.expert_format},
                "weights": self.weights, "weights_total": self.weights_total, "cache_per_session": self.cache,
                "cache_per_session_total": self.session_bytes, "cache_bytes_per_token": self.per_token,
                "workspace": self.workspace, "workspace_total": self.workspace_total, "total": self.total,
                "fits": self.fits, "sessions_that_fit": self.sessions_that_fit,
                "context_that_fits": self.context_that_fits, "fitting_world_size": self.fitting_world_size,
                "notes": self.notes}

    def verdict(self) -> str:
        spare = self.gpu_memory - self.total
        if self.fits:
            return (f"fits: {gib(spare)} spare per GPU; {self.sessions_that_fit} session(s) of {self.context:,} "
                    f"tokens would fit")
        parts = [f"does not fit: {gib(-spare)} over per GPU"]
        if self.for_caches <= 0:
            parts.append(f"the weights and workspace alone need {gib(self.weights_total + self.workspace_total)}")
        else:
            parts.append(f"{self.sessions_that_fit} session(s) of {self.context:,} tokens would fit, or "
                         f"{self.sessions} of {self.context_that_fits:,} tokens")
        w = self.fitting_world_size
        parts.append(f"world size {w} would fit it" if w else "no valid world size fits it on GPUs of this size")
        return "; ".join(parts)

    def table(self) -> str:
        fmt = {"fp8": "FP8 + scales", "fp4": "FP4 + scales", "float": self.dtype}
        expert_note = f"{self.experts // self.world_size} of {self.experts} per layer"
        what = {"attention": fmt[self.linear_format] + ("; wq_b, wo_a, wo_b split" if self.world_size > 1 else ""),
                "indexer": "replicated", "compressors": f"{self.dtype}; ape fp32",
                "routed experts": f"{fmt[self.expert_format]}; {expert_note}",
                "shared experts": fmt[self.linear_format], "router": self.dtype,
                "embed + head": self.dtype + ("; split by vocabulary" if self.world_size > 1 else ""),
                "norms + mHC": f"norms {self.dtype}; mHC and sinks fp32"}
        w = self.world_size
        lines = [f"{self.name} on {w} GPU{'s' if w > 1 else ''} of {gib(self.gpu_memory)}: {self.sessions} "
                 f"session(s) of {self.context:,} tokens; cache {self.dtype}, indexer keys {self.index_dtype}",
                 "", f"{'per GPU':<44}{'GiB':>9}"]

        def row(label, n, note="", indent=2):
            lines.append(f"{' ' * indent}{label:<{42 - indent + 2}}{n / GiB:>9.2f}" + (f"   {note}" if note else ""))

        row("weights", self.weights_total, indent=0)
        for g, n in self.weights.items():
            if n:
                row(g, n, what[g])
        row(f"cache, {self.sessions} session(s)", self.sessions * self.session_bytes,
            f"{self.per_token:,.0f} B/token; every GPU holds every session's whole cache", indent=0)
        for k, n in self.cache.items():
            row(CACHE_LABELS[k], n, "per session")
        row("workspace", self.workspace_total, indent=0)
        for k, n in self.workspace.items():
            if n:
                row(k, n, f"chunk {self.chunk:,} tokens" if k == "prefill activations" else "")
        row("total", self.total, f"of {gib(self.gpu_memory)}", indent=0)
        lines += ["", self.verdict()] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def plan(config: ModelConfig, world_size: int, gpu_memory: int, context: int | None = None, sessions: int = 1,
         dtype: str = "bfloat16", index_dtype: str | None = None, chunk: int = DEFAULT_CHUNK,
         linear_format: str = "fp8", expert_format: str = "fp4", name: str = "model", _search: bool = True) -> Plan:
    """The memory plan of rank 0 (every rank alike); raises ConfigError for a world size that cannot split the model.
    When it does not fit, `fitting_world_size` is the smallest valid world size that would (None: none)."""
    check_world_size(config, world_size)
    if dtype not in DTYPE_BYTES or (index_dtype or dtype) not in DTYPE_BYTES:
        raise ConfigError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {dtype!r} / {index_dtype!r}")
    index_dtype = index_dtype or dtype
    context = config.max_position_embeddings if context is None else context
    if context < 1 or sessions < 1 or chunk < 1 or gpu_memory < 1:
        raise ConfigError("context, sessions, chunk and gpu_memory must be positive")
    notes = []
    if context > config.max_position_embeddings:
        notes.append(f"{context:,} tokens exceed the model's max_position_embeddings="
                     f"{config.max_position_embeddings:,}; the engine refuses longer contexts")
    el, iel = DTYPE_BYTES[dtype], DTYPE_BYTES[index_dtype]
    p = Plan(name=name, world_size=world_size, gpu_memory=int(gpu_memory), context=context, sessions=sessions,
             dtype=dtype, index_dtype=index_dtype, chunk=chunk, linear_format=linear_format,
             expert_format=expert_format,
             weights=weight_bytes(config, world_size, dtype, linear_format, expert_format),
             cache=cache_parts(config, context, el, iel),
             workspace=workspace_parts(config, context, world_size, dtype, min(chunk, context), linear_format,
                                       expert_format),
             per_token=cache_bytes_per_token(config, el, iel), fixed=fixed_cache_bytes(config, el),
             max_context=config.max_position_embeddings, experts=config.n_routed_experts, notes=notes)
    if _search and not p.fits:
        kw = dict(context=context, sessions=sessions, dtype=dtype, index_dtype=index_dtype, chunk=chunk,
                  linear_format=linear_format, expert_format=expert_format, _search=False)
        p.fitting_world_size = next((w for w in valid_world_sizes(config, config.o_groups) if w > world_size
                                     and plan(config, w, gpu_memory, **kw).fits), None)
    return p


def plan_or_refuse(model: ModelConfig | dict | str | Path, world_size: int, gpu_memory: int, **kw) -> Plan:
    """`plan(...)`, raising DoesNotFit (its message: the plan's table) when it does not fit. `model`: a config,
    a config.json dict or a model folder; from the last two the storage formats and the name are read too."""
    if not isinstance(model, ModelConfig):
        if not isinstance(model, dict):
            kw.setdefault("name", Path(model).name)
            model = json.loads((Path(model) / "config.json").read_text())
        kw.setdefault("linear_format", formats(model)[0])
        kw.setdefault("expert_format", formats(model)[1])
        model = ModelConfig.from_dict(model)
    p = plan(model, world_size, gpu_memory, **kw)
    if not p.fits:
        raise DoesNotFit(p)
    return p


__all__ = ["CUDA_CONTEXT", "DoesNotFit", "NCCL_BUFFERS", "PRESETS", "Plan", "SCORE_BUDGET", "cache_bytes_per_token",
           "cache_parts", "check_world_size", "fixed_cache_bytes", "formats", "plan", "plan_or_refuse", "preset",
           "tensor_bytes", "tensors", "valid_world_sizes", "weight_bytes", "workspace_parts"]
