"""FLOPs counted from shapes: an analytical model of what the sparse runtime computes.

Counted: multiply-adds (2 FLOPs each) of every matmul / einsum / linear, plus the multiply-add
reductions that have the same form (compressor pooling, indexer head weighting, mHC collapse and
expand). Not counted: norms, RoPE, softmax, activations, masking, top-k, Sinkhorn iterations,
gathers and copies (they cost time, not matmul FLOPs; the time split and the profile show them).

Two numbers per category:
- `performed`: what the runtime's kernels actually multiply, including work thrown away by masks:
  the window branch's per-block band (a query block of b queries reads b + window - 1 keys, of which
  each query keeps <= window), the indexer scoring all entries including not-yet-visible ones, and
  HCA's dense product over all entries. This replicates runtime/attention.py `_sparse`'s query block
  rule (block = min(S, 128, score_budget // bytes_per_query)); if that rule changes, update `_block`.
- `useful`: the minimum the model's math needs (each query: <= window keys, its visible entries).

Shapes (B = 1): S new tokens at cache position P; the last layer computes attention outputs, mHC
and MoE for only `keep` positions (logits_to_keep) while its cache still takes all S.
"""

from __future__ import annotations

from collections import defaultdict

from runtime.config import CSA, HCA, SLIDING, ModelConfig
from runtime.timing import ATTN_CATEGORY as _ATTN, COMPRESS_CATEGORY as _COMP  # the time split's categories


def _block(c: ModelConfig, ltype: str, Sq: int, n: int, budget: int) -> int:
    H, d, W = c.num_attention_heads, c.head_dim, c.sliding_window
    per_query = H * (W + 2 * Sq) * 4
    if ltype == CSA and n:
        per_query = max(per_query, c.index_n_heads * n * 4 * 2, H * c.index_topk * (d + 8) * 4)
    elif n:
        per_query = max(per_query, H * n * 4 * 2)
    return max(1, min(Sq, 128, budget // per_query))


def _sum_visible(p0: int, p1: int, rate: int, cap: int | None = None) -> int:
    """sum over positions p in [p0, p1) of min((p+1)//rate, cap): visible entries per query."""
    tot = 0
    v0, v1 = (p0 + 1) // rate, p1 // rate  # (p+1)//rate for p = p0 .. p1-1 goes from v0 to v1
    for v in range(v0, v1 + 1):
        lo = max(p0, v * rate - 1)
        hi = min(p1, (v + 1) * rate - 1)
        if hi > lo:
            tot += (hi - lo) * (v if cap is None else min(v, cap))
    return tot


def _sum_min(q0: int, q1: int, W: int) -> int:
    """sum over positions p in [q0, q1) of min(W, p + 1): keys in each query's window."""
    tot = (q1 - q0) * W
    b = min(q1, W - 1)
    if b > q0:
        tot -= (b - q0) * ((W - 1 - q0) + (W - b)) // 2
    return tot


def compressor_flops(D: int, dim: int, rate: int, overlap: bool, S: int, P: int) -> float:
    c = 2 if overlap else 1
    new = (P + S) // rate - P // rate
    proj = 2 * 2 * S * D * c * dim  # wkv and wgate
    pool = 2 * new * (2 * rate if overlap else rate) * dim
    return proj + pool


def chunk_flops(c: ModelConfig, P: int, S: int, keep: int = 0, score_budget: int = 256 << 20
                ) -> dict[str, dict[str, float]]:
    """{"performed": {cat: flops}, "useful": {cat: flops}} for one call of S tokens at position P."""
    perf, use = defaultdict(float), defaultdict(float)
    D, H, d, W = c.hidden_size, c.num_attention_heads, c.head_dim, c.sliding_window
    Rq, G, Ro, n = c.q_lora_rank, c.o_groups, c.o_lora_rank, c.hc_mult
    HI, dI, k = c.index_n_heads, c.index_head_dim, c.index_topk
    keep = keep if 0 < keep < S else 0
    last = c.num_hidden_layers - 1

    def both(cat, f):
        perf[cat] += f
        use[cat] += f

    for i, t in enumerate(c.layer_types):
        Sq = keep if (keep and i == last) else S
        q0 = P + S - Sq  # absolute position of the first query
        a = _ATTN[t]
        # mHC, attention site: weights + collapse on all S, expand on the Sq kept positions
        both("mhc", 2 * S * (n * D) * ((2 + n) * n) + 2 * S * n * D + 2 * Sq * n * n * D + Sq * n * D)
        # projections
        both(a, 2 * S * D * d)                                   # wkv (all S: the cache takes them)
        both(a, 2 * Sq * D * Rq + 2 * Sq * Rq * H * d)           # wq_a, wq_b
        both(a, 2 * Sq * Ro * H * d + 2 * Sq * G * Ro * D)       # grouped wo_a, wo_b
        nent = 0
        if t != SLIDING:
            rate = c.compress_rates[t]
            both(_COMP[t], compressor_flops(D, d, rate, t == CSA, S, P))
            nent = (P + S) // rate
        if t == CSA:
            both("csa_compress", compressor_flops(D, dI, c.csa_rate, True, S, P))
            both("indexer", 2 * Sq * Rq * HI * dI + 2 * Sq * D * HI)  # indexer wq_b, weights_proj
        # attention core, per query block (the runtime's loop)
        lw_keys = min(P, W - 1) + S   # keys tensor: window rows + all S new
        off = lw_keys - Sq
        b = _block(c, t, Sq, nent, score_budget)
        band_keys = 0
        for qs in range(0, Sq, b):
            qe = min(Sq, qs + b)
            k0 = max(0, off + qs - W + 1)
            band_keys += (qe - qs) * (off + qe - k0)
        perf[a] += 2 * 2 * H * d * band_keys                     # QK^T and PV over the band
        useful_window = _sum_min(q0, P + S, W)
        use[a] += 2 * 2 * H * d * useful_window
        if t == CSA and nent:
            rate = c.csa_rate
            perf["indexer"] += 2 * Sq * HI * dI * nent + 2 * Sq * HI * nent  # scores vs all entries, head weighting
            vis = _sum_visible(q0, P + S, rate)
            use["indexer"] += 2 * HI * dI * vis + 2 * HI * vis
            perf[a] += 2 * 2 * H * d * Sq * min(k, nent)               # gathered top-k entries
            use[a] += 2 * 2 * H * d * _sum_visible(q0, P + S, rate, cap=k)
        elif t == HCA and nent:
            perf[a] += 2 * 2 * H * d * Sq * nent                      # dense over all entries
            use[a] += 2 * 2 * H * d * _sum_visible(q0, P + S, c.hca_rate)
        # MoE site (Sq positions): mHC weights + collapse + expand, gate, routed + shared experts
        both("mhc", 2 * Sq * (n * D) * ((2 + n) * n) + 2 * Sq * n * D + 2 * Sq * n * n * D + Sq * n * D)
        both("moe", 2 * Sq * D * c.n_routed_experts + Sq * (c.num_experts_per_tok + 1) * 3 * 2 * D * c.moe_intermediate_size)
    K = keep or S
    both("mhc", 2 * K * (n * D) * n + 2 * K * n * D)   # hyper-head
    both("other", 2 * K * D * c.vocab_size)             # vocabulary head
    return {"performed": dict(perf), "useful": dict(use)}


def add(acc: dict, part: dict) -> dict:
    for kind, cats in part.items():
        tgt = acc.setdefault(kind, {})
        for cat, v in cats.items():
            tgt[cat] = tgt.get(cat, 0.0) + v
    return acc


def prefill_flops(c: ModelConfig, L: int, chunk: int, keep: int = 1, score_budget: int = 256 << 20) -> dict:
    acc: dict = {}
    for s in range(0, L, chunk):
        add(acc, chunk_flops(c, s, min(L, s + chunk) - s, keep, score_budget))
    return acc


def decode_flops(c: ModelConfig, P: int, steps: int, score_budget: int = 256 << 20) -> dict:
    """Per-token average over `steps` decode steps starting at position P."""
    acc: dict = {}
    for j in range(steps):
        add(acc, chunk_flops(c, P + j, 1, 0, score_budget))
    return {kind: {cat: v / steps for cat, v in cats.items()} for kind, cats in acc.items()}


def total(d: dict) -> float:
    return float(sum(d.values()))


def decode_bytes(c: ModelConfig, P: int, elem: int = 4, index_elem: int | None = None) -> float:
    """Bytes one decode step at position P must read at least: the weights it uses (embedding row,
    attention, compressors, indexer, mHC in fp32, gate, the active experts, the vocabulary head) and
    the cache it attends to (window rows, every indexer key, the top-k gathered CSA entries, every HCA
    entry). The floor a bandwidth-bound decode (GPU) is measured against; activations are ignored.
    `index_elem`: bytes per stored indexer-key element (the cache's index dtype; default `elem`)."""
    D, H, d, W = c.hidden_size, c.num_attention_heads, c.head_dim, c.sliding_window
    Rq, G, Ro, n = c.q_lora_rank, c.o_groups, c.o_lora_rank, c.hc_mult
    HI, dI = c.index_n_heads, c.index_head_dim
    w = D  # embedding row
    f32 = 0
    cache = keys = 0
    for t in c.layer_types:
        w += D * Rq + Rq * H * d + D * d + H * d * Ro + G * Ro * D
        f32 += 2 * ((2 + n) * n * n * D)
        w += D * c.n_routed_experts + (c.num_experts_per_tok + 1) * 3 * D * c.moe_intermediate_size
        cache += min(P, W - 1) * d
        if t == CSA:
            w += 2 * D * 2 * d + Rq * HI * dI + D * HI + 2 * D * 2 * dI
            N = (P + 1) // c.csa_rate
            keys += N * dI
            cache += min(c.index_topk, N) * d
        elif t == HCA:
            w += 2 * D * d
            cache += ((P + 1) // c.hca_rate) * d
    w += c.vocab_size * D
    f32 += n * n * D
    return float((w + cache) * elem + keys * (elem if index_elem is None else index_elem) + f32 * 4)
