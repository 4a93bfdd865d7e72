"""DeepSeek-V4 attention: sliding window + compressed KV (CSA with lightning indexer, or HCA).

One shared K=V head per layer (MQA), per-head attention sinks in the softmax denominator, a
low-rank q path with a per-head unweighted norm, partial interleaved RoPE (de-rotated on the
output at the query position) and a grouped low-rank output projection. Parameter names are the
official checkpoint's (`wq_a`, `wkv`, `attn_sink`, `compressor.ape`, `indexer.wq_b`, ...).

Two implementations of the same semantics, chosen by `impl`:
- "sparse" (default): queries in blocks; the window branch reads only the <= sliding_window keys
  of each block's band, CSA gathers at most `index_topk` entries per query, HCA attends densely to
  its (128x fewer) entries -- those every query of a block sees, when nothing is captured, in fused flash
  passes whose log-sum-exps join the block's softmax (`dense_attention`); indexer scores are computed per
  query block under `score_budget` bytes. Nothing of size (new tokens x context tokens) exists beyond one block.
- "eager": the plain reference, transformers-style dense masks over window + all entries. For
  small inputs and for tests of the sparse path.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .cache import CompressorState, LayerCache
from .config import CSA, SLIDING, ModelConfig
from .layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq, unweighted_rms_norm
from .parallel import SINGLE, Shard, all_reduce
from .timing import region

NEG_INF = float("-inf")


class Compressor(nn.Module):
    """Gated softmax pooling of every `rate` tokens into one entry (paper §2.3).

    CSA (`overlap=True`): each token projects to 2*dim features; entry w pools window w-1's first
    half (Ca) and window w's second half (Cb) over 2*rate slots. HCA: plain non-overlapping windows.
    The softmax runs per channel over the slots; `ape` is a learned per-slot bias on the gate.
    """

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        c = 2 if overlap else 1
        self.dim, self.rate, self.overlap = dim, rate, overlap
        self.wkv = nn.Linear(hidden, c * dim, bias=False)
        self.wgate = nn.Linear(hidden, c * dim, bias=False)
        self.ape = nn.Parameter(torch.zeros(rate, c * dim, dtype=torch.float32))
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, state: CompressorState, inv_freq: torch.Tensor, offset: int = 0) -> int:
        """Pools every window completed by x's tokens into state.entries; returns how many were added.
        `offset`: added to each new entry's RoPE position (Transformer.hidden's position_offset)."""
        return self.absorb(self.wkv(x), self.wgate(x), state, inv_freq, offset)

    def absorb(self, kv: torch.Tensor, gate: torch.Tensor, state: CompressorState, inv_freq: torch.Tensor,
               offset: int = 0) -> int:
        """forward's pooling of the projections kv = wkv(x), gate = wgate(x) [B, S, c*dim] (the compiled
        decode step, runtime/compiled.py, projects inside its fused region and pools here)."""
        B = kv.shape[0]
        if state.buffer_kv is not None and state.buffer_kv.shape[1]:
            kv = torch.cat([state.buffer_kv, kv], dim=1)
            gate = torch.cat([state.buffer_gate, gate], dim=1)
        usable = kv.shape[1] // self.rate * self.rate
        # clone: a view would pin the whole chunk's projections in memory until the next call
        state.buffer_kv, state.buffer_gate = kv[:, usable:].clone(), gate[:, usable:].clone()
        if usable == 0:
            return 0
        nw, r, d = usable // self.rate, self.rate, self.dim
        ckv = kv[:, :usable].view(B, nw, r, -1)  # [B, nw, rate, c*dim]
        cgate = gate[:, :usable].view(B, nw, r, -1) + self.ape  # fp32 from here (ape is fp32)
        if self.overlap:
            slots_kv = ckv.new_zeros(B, nw, 2 * r, d)  # [B, nw, 2*rate, dim]
            slots_gate = cgate.new_full((B, nw, 2 * r, d), NEG_INF)
            slots_kv[:, :, r:] = ckv[..., d:]
            slots_gate[:, :, r:] = cgate[..., d:]
            slots_kv[:, 1:, :r] = ckv[:, :-1, :, :d]
            slots_gate[:, 1:, :r] = cgate[:, :-1, :, :d]
            if state.overlap_kv is not None:  # window 0's previous half comes from the last call
                slots_kv[:, 0, :r] = state.overlap_kv.to(slots_kv.dtype)
                slots_gate[:, 0, :r] = state.overlap_gate.to(slots_gate.dtype)
            state.overlap_kv = ckv[:, -1, :, :d].clone()
            state.overlap_gate = cgate[:, -1, :, :d].clone()
            ckv, cgate = slots_kv, slots_gate
        alpha = cgate.softmax(dim=2, dtype=torch.float32).to(ckv.dtype)
        pooled = self.norm((ckv * alpha).sum(dim=2))  # [B, nw, dim]
        pos = (state.count + torch.arange(nw, device=kv.device)) * r + offset  # each entry sits at its window start
        cos, sin = rope_cos_sin(inv_freq, pos, pooled.dtype)
        state.entries.append(apply_rope(pooled, cos, sin))
        return nw


class Indexer(nn.Module):
    """Lightning indexer: I[t,s] = sum_h w[t,h] * ReLU(q[t,h] . K[s]) / sqrt(d_I), top-k per query."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, cfg.csa_rate, True, cfg.rms_norm_eps)

    def queries(self, x, cq, cos, sin):
        B, S, _ = x.shape
        q = self.wq_b(cq).view(B, S, self.n_heads, self.head_dim)  # [B, S, H_I, d_I]
        q = apply_rope(q, cos[:, None], sin[:, None]).float()
        w = self.weights_proj(x).float() * self.n_heads ** -0.5  # [B, S, H_I]
        return q, w

    def scores(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[B, Sq, N] fp32 index scores of queries q [B,Sq,H_I,d_I] against keys [B,N,d_I]."""
        B, Sq, H, d = q.shape
        if keys.dtype == torch.bfloat16:  # bf16 keys (Cache.index_dtype): bf16 matmul, fp32 from here on
            # keys @ q^T streams the [N, d] keys row by row: ~40x faster on CPU than q @ keys^T in bf16
            if B * Sq == 1:  # decode
                s = one_query_logits(keys[0], q.reshape(H, d).to(keys.dtype))  # [N, H_I]
                return one_query_head_sum(s, w.reshape(H) * d ** -0.5).view(1, 1, -1)
            else:
                s = torch.matmul(keys, q.reshape(B, Sq * H, d).to(keys.dtype).transpose(1, 2))  # [B, N, Sq*H_I]
                s = s.transpose(1, 2).float()  # strided view: the head-sum bmm reads it as fast as a copy
        else:
            s = torch.matmul(q.reshape(B, Sq * H, d), keys.float().transpose(1, 2))  # [B, Sq*H_I, N]
        s = torch.relu_(s).view(B * Sq, H, -1)
        w = (w * d ** -0.5).reshape(B * Sq, 1, H)
        return torch.bmm(w, s).view(B, Sq, -1)  # the head sum as one batched matmul


def one_query_logits(keys: torch.Tensor, q: torch.Tensor, group: int = 4) -> torch.Tensor:
    """keys [N, d] @ q [H, d]^T -> [N, H] for one query's heads, in the keys' dtype. Decode streams every
    key through here; oneDNN's bf16 kernel is memory-bound but wastes time on a 4-column output, so
    ``group`` keys form one row of [N / g, g * d] against a block-diagonal [g * d, g * H] query: the same
    products and sums (the off-diagonal blocks add exact zeros): measured here ~20% faster than
    [N, d] @ [d, H] and ~1.5x faster than bmm over 262k keys."""
    N, d = keys.shape
    H = q.shape[0]
    out = keys.new_empty(N, H)
    m = N // group * group
    if m:
        # the block-diagonal [g*H, g*d] query (block (i, i) = q): two ops, not block_diag's ~100 us of copies
        qb = q.new_zeros(group, H, group, d)
        qb.diagonal(dim1=0, dim2=2).copy_(q.unsqueeze(-1).expand(H, d, group))
        qb = qb.view(group * H, group * d)
        torch.mm(keys[:m].view(m // group, group * d), qb.t(), out=out[:m].view(m // group, group * H))
    if m < N:
        torch.mm(keys[m:], q.t(), out=out[m:])
    return out


def one_query_head_sum(s: torch.Tensor, w: torch.Tensor, group: int = 4) -> torch.Tensor:
    """relu(s [N, H]) (one query's per-head logits, any float dtype) @ w [H] -> fp32 scores [N]. As in
    one_query_logits, `group` rows form one row of [N / g, g * H] against a block-diagonal [g * H, g] w:
    measured here ~2x faster over 262k keys than the transpose to [H, N] and a batched matmul (the head sum
    is in fp32 either way; the summation order may differ in the last bit)."""
    N, H = s.shape
    out = torch.empty(N, dtype=torch.float32, device=s.device)
    m = N // group * group
    w = w.float()
    if m:
        wb = w.new_zeros(group, H, group)
        wb.diagonal(dim1=0, dim2=2).copy_(w[:, None].expand(H, group))  # block (j, j) = w
        # ReLU after the conversion: ~2x faster in fp32 than in bf16 here, and exact either way
        torch.mm(torch.relu_(s[:m].reshape(m // group, group * H).float()), wb.view(group * H, group),
                 out=out[:m].view(m // group, group))
    if m < N:
        torch.mv(torch.relu(s[m:].float()), w, out=out[m:])
    return out


def dense_attention(q: torch.Tensor, entries: torch.Tensor, scale: float, parts: int = 1):
    """Softmax attention of q [B, Sq, H, d] over all of entries [B, n, d] (K = V) in fused passes (CPU flash
    attention: online softmax, no [Sq, n] logits), one per run of entries: (outputs [B, Sq, H, P, d],
    log-sum-exp of each run's scaled logits [B, H, Sq, P]). A run's output weighted by the softmax of the
    log-sum-exps over runs is attention over all entries; the kernel parallelises over runs only, so
    `parts` (torch threads) runs of ~n/parts entries each keep every thread busy. Decode reads the entries
    once instead of twice (logits, then values)."""
    B, Sq, H, d = q.shape
    n = entries.shape[1]
    P = max(1, min(parts, n // 256))
    m = n // P
    # P equal runs as a batch (a view of the contiguous entries), the n - P*m left over as one more run
    runs = [entries[:, : P * m].reshape(B * P, 1, m, d)] + ([entries[:, P * m :, None].transpose(1, 2)]
                                                           if n > P * m else [])
    outs, lses = [], []
    for r in runs:
        bp = r.shape[0] // B
        qr = q.reshape(B, 1, 1, Sq * H, d).expand(B, bp, 1, Sq * H, d).reshape(B * bp, 1, Sq * H, d)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qr, r, r, scale=scale)
        outs.append(o.view(B, bp, Sq, H, d))
        lses.append(lse.view(B, bp, Sq, H))
    o = torch.cat(outs, 1).permute(0, 2, 3, 1, 4)  # [B, Sq, H, P', d]
    lse = torch.cat(lses, 1).permute(0, 3, 2, 1)  # [B, H, Sq, P']
    return o, lse


def select_topk(scores: torch.Tensor, threshold: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                include: torch.Tensor | None = None):
    """Top-k visible entries per query: (ids [B,Sq,K] with -1 for picks past the query, scores).

    `exclude` / `include` [N] bool (runtime/steering.py; None on the default path, which they leave
    untouched): excluded entries are never picked, included visible ones always are."""
    n = scores.shape[-1]
    k = min(k, n)
    if int(threshold.min()) < n:  # some entries lie in a query's future (never in decode)
        scores = scores.masked_fill(torch.arange(n, device=scores.device) >= threshold[:, None], NEG_INF)
    if exclude is not None or include is not None:
        return _steered_topk(scores, threshold, k, exclude, include)
    top = _prefiltered_topk(scores, k) if scores.numel() == n and n >= PREFILTER_MIN else None
    if top is None:
        top = _topk_lowest_id_ties(scores, k)
    ids = torch.where(top[0] >= threshold[:, None], -1, top[0])
    return ids, top[1]


def _steered_topk(scores, threshold, k, exclude, include):
    """select_topk under a Steering: excluded scores -inf and included visible ones +inf before the same
    top-k (no prefilter); a pick that only an excluded or future entry could fill is -1, so an excluded
    entry is never read. At most k included entries keep their place (the caller checks there are no more).
    The scores returned are the indexer's, also for forced picks."""
    raw = scores
    if exclude is not None:
        scores = scores.masked_fill(exclude, NEG_INF)
    if include is not None:
        forced = include if exclude is None else include & ~exclude
        visible = torch.arange(scores.shape[-1], device=scores.device) < threshold[:, None]  # [Sq, N]
        scores = scores.masked_fill(forced & visible, float("inf"))
    ids, _ = _topk_lowest_id_ties(scores, k)
    empty = ids >= threshold[:, None]
    if exclude is not None:
        empty |= exclude[ids]
    ids = ids.masked_fill(empty, -1)
    return ids, raw.gather(-1, ids.clamp(min=0)).masked_fill(empty, NEG_INF)


PREFILTER_MIN = 1 << 15  # entries from which one query's top-k is taken over a prefiltered candidate set
_CHUNK = 256


def _topk_lowest_id_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference selection: (indices, values) of the k largest scores per row."""
    top = scores.topk(k, dim=-1)
    # Exact ties at the k-th score (ReLU makes 0.0 common) are broken towards the lowest entry id,
    # so the selection depends on the scores alone, not on how the sequence was chunked (topk's own
    # tie order varies with the call's shape). Only rows with such a tie pay for it.
    kth = top.values[..., -1:]
    tied = ((scores >= kth).sum(-1) > k) & torch.isfinite(kth[..., 0])
    if tied.any():
        rows = scores[tied]  # [R, N]
        rk = kth[tied]
        eq = rows == rk
        keep = (rows > rk) | (eq & (eq.cumsum(-1) <= k - (rows > rk).sum(-1, keepdim=True)))
        fixed = rows.masked_fill(~keep, NEG_INF).topk(k, dim=-1)
        top.indices[tied], top.values[tied] = fixed.indices, fixed.values
    return top.indices, top.values


def _prefiltered_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The same selection for one query over many entries (decode), in about two passes over the scores
    instead of a full top-k: the k-th largest of the chunk maxima is a lower bound on the k-th largest
    score (k chunks each hold a score at least that high), so only scores reaching it can be picked.
    None when that leaves too many candidates (e.g. ReLU zeros at the bound): the caller takes the full path."""
    row = scores.reshape(-1)
    n = row.numel()
    m = n // _CHUNK * _CHUNK
    maxima = row[:m].view(-1, _CHUNK).amax(-1)  # [n / CHUNK]
    if m < n:
        maxima = torch.cat([maxima, row[m:].amax()[None]])
    if maxima.numel() < k:
        return None
    bound = maxima.topk(k).values[-1]
    if not torch.isfinite(bound):
        return None
    # every score reaching the bound lies in a chunk whose maximum does; typically k chunks: their entries,
    # in ascending order (the tie rule below depends on it), are the candidates, with no pass over all n
    chunks = (maxima >= bound).nonzero().squeeze(1)  # [C]
    if chunks.numel() <= 2 * k:
        ids = (chunks[:, None] * _CHUNK + torch.arange(_CHUNK, device=row.device)).view(-1)  # [C * CHUNK]
        if m < n and int(chunks[-1]) == m // _CHUNK:  # the short last chunk
            ids = ids[: ids.numel() - (_CHUNK - (n - m))]
    else:  # many chunks reach it (ties among the maxima): the scores that reach it, if few
        ids = (row >= bound).nonzero().squeeze(1)
        if ids.numel() > max(64 * k, n // 16):
            return None
    ind, val = _topk_lowest_id_ties(row[ids][None], k)
    return ids[ind].view(*scores.shape[:-1], k), val.view(*scores.shape[:-1], k)


class Attention(nn.Module):
    timer = None  # a runtime.timing.LayerTimer while one is attached (Transformer.attach_timer)

    def __init__(self, cfg: ModelConfig, layer: int, shard: Shard = SINGLE):
        super().__init__()
        self.cfg, self.layer, self.shard = cfg, layer, shard
        self.layer_type = cfg.layer_types[layer]
        # Under tensor parallelism this rank holds H / world query heads and o_groups / world output groups
        # (runtime/parallel.py); everything below works on the local ones, and wo_b's partial sums are added.
        H, d = cfg.num_attention_heads // shard.world, cfg.head_dim
        self.n_heads, self.head_dim, self.window = H, d, cfg.sliding_window
        self.o_groups = cfg.o_groups // shard.world
        self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, H * d, bias=False)
        self.wkv = nn.Linear(cfg.hidden_size, d, bias=False)
        self.kv_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.wo_a = nn.Linear(cfg.num_attention_heads * d // cfg.o_groups, self.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(self.o_groups * cfg.o_lora_rank, cfg.hidden_size, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H, dtype=torch.float32))
        self.compressor = self.indexer = None
        if self.layer_type != SLIDING:
            self.rate = cfg.compress_rates[self.layer_type]
            self.compressor = Compressor(cfg.hidden_size, d, self.rate, self.layer_type == CSA, cfg.rms_norm_eps)
        if self.layer_type == CSA:
            self.indexer = Indexer(cfg)
        self.register_buffer("inv_freq", rope_inv_freq(cfg, compress=self.layer_type != SLIDING), persistent=False)
        self.score_budget = 256 << 20  # bytes of fp32 scratch per query block
        # queries per block at most: 128 keeps CPU work near the useful band; on a GPU, where each block
        # costs a few dozen kernel launches, larger blocks trade wasted window logits for fewer launches
        self.query_block = 128
        # dtype of the fused dense pass over HCA entries in prefill (None: the entries' own, the reference);
        # Transformer.set_prefill_dtype sets it: bf16 where the CPU computes bf16 natively, ~2.5x faster there
        self.dense_dtype: torch.dtype | None = None
        self.batched_window = True  # a sliding layer's prefill chunk in one batched pass (_window_blocks)

    # -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, positions: torch.Tensor, lc: LayerCache, impl: str = "sparse",
                capture=None, keep: int = 0, offset: int = 0, steering=None) -> torch.Tensor:
        """x: normalised input [B,S,D] at absolute `positions` [S]; extends `lc` in place.

        keep=k > 0 computes the output of the last k positions only (the cache still takes all S):
        in the last layer of a long prefill nothing else reads the other outputs.
        offset: added to the RoPE positions of these tokens and of the entries they complete; causality
        and the window still use `positions` (token indices). Only training sets it (Transformer.hidden).
        steering: a runtime.steering.Steering for this forward's CSA selection (None: the default path).
        """
        cos, sin = rope_cos_sin(self.inv_freq, positions + offset, x.dtype)  # [S, r/2]
        kv = self.kv_row(x, cos, sin)
        if keep:
            x_all, x, positions, cos, sin = x, x[:, -keep:], positions[-keep:], cos[-keep:], sin[-keep:]
        else:
            x_all = x
        cq, q = self.queries(x, cos, sin)
        keys = self.extend_window(lc, kv)
        entries = iq = iw = ikeys = None
        if self.compressor is not None:
            self.compressor(x_all, lc.kv, self.inv_freq, offset)
            entries = lc.kv.entries.view()
        if self.indexer is not None:
            self.indexer.compressor(x_all, lc.index, self.inv_freq, offset)
            ikeys = lc.index.entries.view()
            with region(self.timer, "indexer"):
                iq, iw = self.indexer.queries(x, cq, cos, sin)

        steer = None  # (top-k width, excluded [N], included [N]) of a steered CSA selection
        if steering is not None and self.indexer is not None and not steering.empty:
            n = 0 if entries is None else entries.shape[1]
            steer = (steering.index_topk or self.indexer.topk, *steering.entry_masks(n, self.rate, x.device))
        run = self._eager if impl == "eager" else self._sparse
        o = run(q, keys, positions, entries, iq, iw, ikeys, capture, steer)  # [B, S, H, d]
        return self.output(o, cos, sin)

    # Pieces of forward that the compiled decode step (runtime/compiled.py) also calls, in its fused regions.
    def kv_row(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The new tokens' K = V rows [B, S, d]: projected, normalised, rotated."""
        return apply_rope(self.kv_norm(self.wkv(x)), cos, sin)

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(cq [B, S, q_lora_rank], which also feeds the indexer; rotated queries q [B, S, H, d])."""
        B, S, _ = x.shape
        cq = self.q_norm(self.wq_a(x))
        q = unweighted_rms_norm(self.wq_b(cq).view(B, S, self.n_heads, self.head_dim), self.cfg.rms_norm_eps)
        return cq, apply_rope(q, cos[:, None], sin[:, None])

    def extend_window(self, lc: LayerCache, kv: torch.Tensor) -> torch.Tensor:
        """The keys the new tokens' window reads [B, Lw, d]; lc.window becomes their last window-1 (a new tensor)."""
        keys = kv if lc.window is None else torch.cat([lc.window, kv], dim=1)
        lc.window = keys[:, keys.shape[1] - min(keys.shape[1], self.window - 1):].clone()
        return keys

    def output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output o [B, S, H, d] -> [B, S, D]: de-rotated, grouped low-rank projection."""
        B, S = o.shape[:2]
        o = apply_rope(o, cos[:, None], -sin[:, None])  # undo the values' rotation at the query position
        G = self.o_groups
        o = o.reshape(B, S, G, -1)  # [B, S, G, H*d/G]; group g holds heads g*H/G .. (g+1)*H/G-1
        wo_a = self.wo_a.dequantized(o.dtype) if hasattr(self.wo_a, "dequantized") else self.wo_a.weight
        u = torch.einsum("bsgi,gri->bsgr", o, wo_a.view(G, self.cfg.o_lora_rank, -1))
        return all_reduce(self.wo_b(u.flatten(2)), self.shard)

    # -----------------------------------------------------------------------------------------
    def _window_mask(self, positions: torch.Tensor, n_keys: int, start: int = 0) -> torch.Tensor:
        """[S, n_keys - start] True where key j (the last S of n_keys are the new tokens; columns from key
        `start` on) is in query i's window."""
        S = positions.shape[0]
        kidx = torch.arange(start, n_keys, device=positions.device)
        qidx = torch.arange(S, device=positions.device) + (n_keys - S)
        return (kidx[None] <= qidx[:, None]) & (kidx[None] > qidx[:, None] - self.window)

    def _softmax_with_sink(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over [..., keys] plus the per-head sink logit in the denominator only."""
        B, H, Sq, _ = logits.shape
        sink = self.attn_sink.float().view(1, H, 1, 1).expand(B, H, Sq, 1)
        return torch.softmax(torch.cat([logits.float(), sink], dim=-1), dim=-1)

    def _select(self, iq, iw, ikeys, thr, steer):
        """The CSA selection of a block of queries: select_topk over the indexer's scores, steered or not."""
        scores = self.indexer.scores(iq, iw, ikeys)
        if steer is None:
            return select_topk(scores, thr, self.indexer.topk)
        return select_topk(scores, thr, *steer)

    def _eager(self, q, keys, positions, entries, iq, iw, ikeys, capture, steer=None):
        B, S, H, d = q.shape
        mask = self._window_mask(positions, keys.shape[1]).expand(B, S, -1)  # [B, S, Lw]
        sel = sel_scores = None
        if entries is not None and entries.shape[1]:
            thr = (positions + 1) // self.rate
            visible = torch.arange(entries.shape[1], device=q.device)[None] < thr[:, None]  # [S, N]
            if self.indexer is not None:
                with region(self.timer, "indexer"):
                    sel, sel_scores = self._select(iq, iw, ikeys, thr, steer)
                picked = torch.zeros(B, S, entries.shape[1] + 1, dtype=torch.bool, device=q.device)
                picked.scatter_(-1, torch.where(sel < 0, entries.shape[1], sel), True)
                visible = picked[..., :-1]
            keys = torch.cat([keys, entries], dim=1)
            mask = torch.cat([mask, visible.expand(B, S, -1)], dim=-1)
        logits = torch.einsum("bqhd,bkd->bhqk", q, keys) * d ** -0.5
        logits = logits.masked_fill(~mask[:, None], NEG_INF)
        probs = self._softmax_with_sink(logits)
        if capture is not None:
            self._record(capture, positions, probs, mask.shape[-1] - (0 if entries is None else entries.shape[1]),
                         sel, sel_scores, entries, dense=True)
        return torch.einsum("bhqk,bkd->bqhd", probs[..., :-1].to(keys.dtype), keys)

    def _sparse(self, q, keys, positions, entries, iq, iw, ikeys, capture, steer=None):
        B, S, H, d = q.shape
        Lw = keys.shape[1]
        off = Lw - S  # keys index of query 0 (queries are always the last S new tokens)
        n = 0 if entries is None else entries.shape[1]
        per_query = H * (self.window + 2 * S) * 4  # bytes of window logits per query (upper bound)
        if self.indexer is not None and n:
            topk = self.indexer.topk if steer is None else steer[0]
            per_query = max(per_query, self.indexer.n_heads * n * 4 * 2, H * topk * (d + 8) * 4)
        elif n:
            per_query = max(per_query, H * n * 4 * 2)
        # 128 queries per block: each then reads at most 255 window keys for its <= 128 useful ones
        block = max(1, min(S, self.query_block, self.score_budget // per_query))
        scale = d ** -0.5
        if (self.batched_window and n == 0 and capture is None and S > block and S % block == 0
                and q.device.type == "cpu"
                and not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad))
                and B * H * S * (block + self.window) * 4 * 2 <= self.score_budget):
            return self._window_blocks(q, keys, off, block, scale)  # a sliding layer's prefill chunk
        # split, not slices: in training, each slice's backward writes a zero tensor of the whole input
        # (per block, so O(S^2 / block) memory traffic); split's backward is one concatenation
        q_blocks = q.split(block, dim=1)
        dense_entries = None  # the entries in dense_dtype, converted once per call (prefill only)
        iq_blocks = iw_blocks = None
        if self.indexer is not None and n:
            iq_blocks, iw_blocks = iq.split(block, dim=1), iw.split(block, dim=1)
        outs = []
        for bi, qs in enumerate(range(0, S, block)):
            qe = min(S, qs + block)
            qb, pos = q_blocks[bi], positions[qs:qe]
            k0 = max(0, off + qs - self.window + 1)  # first key any query of the block can see
            kw = keys[:, k0 : off + qe]  # [B, Lb, d]
            lw = torch.einsum("bqhd,bkd->bhqk", qb, kw) * scale
            if S > 1:  # one new token (decode) sees all of the <= window keys: its band is all true
                lw = lw.masked_fill(~self._window_mask(pos, off + qe, k0), NEG_INF)  # band [Sq, Lb]
            sel = sel_scores = kc = oc = None
            if n:
                thr = (pos + 1) // self.rate
                if self.indexer is not None:
                    with region(self.timer, "indexer"):
                        sel, sel_scores = self._select(iq_blocks[bi], iw_blocks[bi], ikeys, thr, steer)
                    bidx = torch.arange(B, device=q.device)[:, None, None]
                    kc = entries[bidx, sel.clamp(min=0)]  # [B, Sq, K, d]: the only entries this block reads
                    lc = torch.einsum("bqhd,bqkd->bhqk", qb, kc) * scale
                    lc = lc.masked_fill((sel < 0)[:, None], NEG_INF)
                else:
                    # entries [0, t0) are seen by every query of the block: fused passes over them (CPU, not
                    # captured), each standing in as one logit, its log-sum-exp, whose value is its softmax-
                    # weighted average -- the same softmax, split in parts; the rest is masked per query.
                    # Not under autograd: the fused kernel's backward drops the log-sum-exp's gradient.
                    fused = capture is None and q.device.type == "cpu" and not (
                        torch.is_grad_enabled() and (qb.requires_grad or entries.requires_grad))
                    t0 = int(thr.min()) if fused else 0
                    parts = []
                    if t0:
                        qd, ed = qb, entries
                        if S > 1 and self.dense_dtype not in (None, entries.dtype):
                            if dense_entries is None:
                                dense_entries = entries.to(self.dense_dtype)
                            qd, ed = qb.to(self.dense_dtype), dense_entries
                        oc, lse = dense_attention(qd, ed[:, :t0], scale, torch.get_num_threads())
                        if qd is not qb:  # back to the model's dtype: the softmax over the parts stays in it
                            oc, lse = oc.to(qb.dtype), lse.to(qb.dtype)
                        parts.append(lse)  # [B, H, Sq, P]; oc [B, Sq, H, P, d]
                    if t0 < n:
                        kc = entries[:, t0:]
                        lr = torch.einsum("bqhd,bnd->bhqn", qb, kc) * scale
                        parts.append(lr.masked_fill(torch.arange(t0, n, device=q.device)[None] >= thr[:, None],
                                                    NEG_INF))
                    lc = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
                probs = self._softmax_with_sink(torch.cat([lw, lc], dim=-1))
            else:
                probs = self._softmax_with_sink(lw)
            c0 = kw.shape[1]  # probs columns: window keys, [fused runs], [entries], sink
            pw = probs[..., :c0].to(kw.dtype)
            o = torch.einsum("bhqk,bkd->bqhd", pw, kw)
            if oc is not None:  # each run's output weighted by its share of the softmax
                o = o + torch.einsum("bhqp,bqhpd->bqhd", probs[..., c0 : c0 + oc.shape[3]].to(oc.dtype), oc)
                c0 += oc.shape[3]
            if kc is not None:
                pc = probs[..., c0:-1].to(kc.dtype)
                o = o + (torch.einsum("bhqk,bqkd->bqhd", pc, kc) if sel is not None
                         else torch.einsum("bhqn,bnd->bqhd", pc, kc))
            outs.append(o)
            if capture is not None:
                self._record(capture, pos, probs, kw.shape[1], sel, sel_scores, entries)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _window_blocks(self, q, keys, off, block, scale):
        """Window-only attention of S = nb * block queries (a sliding layer's prefill chunk) in one fused
        pass instead of nb block iterations: block j reads the block + W - 1 keys ending at its last query
        (an overlapping view of the keys, zero rows in front where the context is shorter) under a band
        mask that is the same for every block, through CPU flash attention (no [queries x keys] logits in
        memory); the sink joins the softmax afterwards: with Z = exp(lse) of the keys, the sink's share is
        exp(sink) / (Z + exp(sink)), so the output scales by sigmoid(lse - sink). In the model's dtype: bf16
        here (dense_dtype) was measured 1.04x faster over a whole 262k prefill but moved the logits ~100x more
        than the HCA pass does (bench/prefill_hca.py). On the shipped model's 4,096-token chunk: 12.9 ms
        against 22.5 ms for the logits-softmax-matmul form of the same blocks."""
        B, S, H, d = q.shape
        W, nb = self.window, S // block
        L = block + W - 1  # keys per block
        pad = max(0, W - 1 - off)
        kp = torch.nn.functional.pad(keys, (0, 0, pad, 0)) if pad else keys  # [B, pad + Lw, d]
        start = off + pad - (W - 1)  # kp index of block 0's first key
        kb = kp[:, start : start + S + W - 1].unfold(1, L, block).transpose(2, 3)  # [B, nb, L, d]: overlapping
        dt = q.dtype
        # [block, L]: key c in query i's window -- the loop's mask of a block whose last query is key L - 1
        band = self._window_mask(torch.arange(block, device=q.device), L)
        if pad:  # the first blocks also mask the padding rows
            c = torch.arange(L, device=q.device)
            j = torch.arange(nb, device=q.device)
            real = (j[:, None] * block + c[None] + start - pad) >= 0  # [nb, L]
            band = (band[None] & real[:, None]).repeat(B, 1, 1)  # [B * nb, block, L]
        # rows are (query, head) pairs of one block against its one K = V head, as dense_attention does
        allowed = band.unsqueeze(-2).expand(*band.shape[:-1], H, L).reshape(*band.shape[:-2], block * H, L)
        if pad:
            allowed = allowed.unsqueeze(1)  # [B * nb, 1, rows, L] (the kernel takes 2-d or 4-d masks)
        mask = torch.zeros(allowed.shape, dtype=dt, device=q.device).masked_fill_(~allowed, NEG_INF)
        qr = q.reshape(B * nb, 1, block * H, d).to(dt)
        kr = kb.reshape(B * nb, 1, L, d).to(dt)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qr, kr, kr, attn_mask=mask, scale=scale)
        keep = torch.sigmoid(lse.float().view(B, nb, block, H) - self.attn_sink.float().view(1, 1, 1, H))
        return (o.float().view(B, nb, block, H, d) * keep[..., None]).to(q.dtype).reshape(B, S, H, d)

    def _record(self, capture, positions, probs, n_window, sel, sel_scores, entries, dense=False):
        """Hands what this block attended to to the capture (head-averaged; read-only). `dense`: probs has a
        column per entry (eager), not one per pick."""
        if self.shard.active:  # the mean over all heads: this rank's head sum, added across ranks
            p = all_reduce(probs.sum(dim=1), self.shard) / self.cfg.num_attention_heads
        else:
            p = probs.mean(dim=1)  # [B, Sq, keys + 1]
        mass = torch.stack([p[..., :n_window].sum(-1), p[..., n_window:-1].sum(-1), p[..., -1]], dim=-1)
        comp = p[..., n_window:-1]
        if sel is not None and dense:  # eager: one column per entry (also when every entry is picked)
            comp = comp.gather(-1, sel.clamp(min=0)).masked_fill(sel < 0, 0.0)
        capture.add(self.layer, self.layer_type, positions, mass, sel, sel_scores,
                    comp if self.layer_type != SLIDING else None)


__all__ = ["Attention", "Compressor", "Indexer", "dense_attention", "one_query_head_sum", "one_query_logits",
           "select_topk"]
