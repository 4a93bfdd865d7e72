"""Training-only auxiliary losses on the CSA layer's retrieval path (nothing here runs at inference).

The lightning indexer's top-k is not differentiable, so the language-model loss never reaches the
indexer; and a tiny model does not leave the retrieval plateau from the LM loss alone
(/work/shared/design/default_model.md §3.2). This module recomputes, from the CSA layer's own
submodules and the inputs captured by a forward pre-hook, the quantities the runtime computes inside
``Attention.forward`` -- it changes no runtime numerics:

* main CSA logits of selected queries against *all* visible compressed entries (the entries are taken
  from the cache the forward pass just filled, so gradients flow into the compressor and the q path);
* lightning-indexer scores of the same queries, on **detached** inputs (the indexer learns only from
  these losses, as in DeepSeek-V3.2).

Losses (all means over the queries they apply to):
* ``csa_sup``: cross-entropy of the head-mean main logits toward the set of entries holding the value
  being copied (-log of the softmax mass on that set);
* ``idx_sup``: the same on the indexer scores;
* ``idx_kl``: KL(p || softmax(I)) where p is the main attention over compressed entries, averaged over
  heads and renormalised (detached) -- V3.2's indexer objective, computed densely over all visible entries;
* ``slot_sup``: per head: head ``p mod rate`` toward the entry whose own window holds the copied token
  ``p`` (train/train.py explains the slot layout this goes with);
* ``read_logits``: the CSA attention output read through the output head, for a cross-entropy on the
  answer token (computed in train/train.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.cache import CompressorState
from runtime.layers import apply_rope, rope_cos_sin, unweighted_rms_norm


class CSAProbe:
    """Captures the CSA layer's attention input during a forward and computes the auxiliary losses."""

    def __init__(self, model, layer: int):
        self.model, self.layer = model, layer
        self.attn = model.layers[layer].attn
        self.indexer = self.attn.indexer  # kept even while the forward runs with the indexer detached
        assert self.indexer is not None, f"layer {layer} is not a CSA layer"
        self.x = self.y = None
        self.skip = None
        self._h = self.attn.register_forward_pre_hook(self._hook)
        self._ho = self.attn.register_forward_hook(self._out_hook)

    def begin(self, skip: tuple[int, int] | None = None):
        """Before a forward: forget the last one. skip = (index, gap): the forward runs in two calls and
        tokens from `index` on sit `gap` RoPE positions further (train.py pick_skip)."""
        self.x = self.y = None
        self.skip = skip

    def _second_chunk(self) -> bool:
        return self.skip is not None and self.x is not None and self.x.shape[1] == self.skip[0]

    def _hook(self, module, args):
        x = args[0]  # [B, S, D] normalised attention input (part of the graph)
        self.x = torch.cat([self.x, x], dim=1) if self._second_chunk() else x

    def _out_hook(self, module, args, out):
        # [B, T, D] the CSA layer's attention output; _hook has already taken this call's input
        join = self.skip is not None and self.y is not None and self.y.shape[1] == self.skip[0]
        self.y = torch.cat([self.y, out], dim=1) if join else out

    def read_logits(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits read straight off the CSA attention output at (rows, cols) through the
        (tied) output head: a short gradient path to the copy circuit (compressor values, wo_a, wo_b)."""
        y = unweighted_rms_norm(self.y[rows, cols], self.model.config.rms_norm_eps)
        return self.model.head(y).float()

    def remove(self):
        self._h.remove()
        self._ho.remove()

    def _main_logits(self, x_b, entries_b, pos):
        """Head-wise main logits [H, Q, N] of queries at positions pos (1-D) for one sequence."""
        a = self.attn
        cos, sin = rope_cos_sin(a.inv_freq, rope_positions(pos, self.skip), x_b.dtype)
        xq = x_b[pos]  # [Q, D]
        cq = a.q_norm(a.wq_a(xq))
        q = unweighted_rms_norm(a.wq_b(cq).view(len(pos), a.n_heads, a.head_dim), a.cfg.rms_norm_eps)
        q = apply_rope(q, cos[:, None], sin[:, None])
        return torch.einsum("qhd,nd->hqn", q, entries_b) * a.head_dim ** -0.5, cq

    def losses(self, cache, sup: list[list[tuple[int, list[int]]]], kl_pos: list[torch.Tensor]):
        """sup[b] = [(query position, [target entry ids]), ...]; kl_pos[b] = LongTensor of query positions.

        Returns dict of scalar losses (and a few detached metrics)."""
        a, ix = self.attn, self.indexer
        x = self.x
        entries = cache.layers[self.layer].kv.entries.view()  # [B, N, d], attached to the graph
        B, T, _ = x.shape
        rate = a.rate
        out = {"csa_sup": [], "idx_sup": [], "idx_kl": [], "idx_hit": [], "csa_top1": [], "slot_sup": []}
        xd = x.detach()
        dev = x.device
        for b in range(B):
            qpos = [s[0] for s in sup[b]]
            pos = torch.tensor(qpos, dtype=torch.long, device=dev)
            pos = torch.cat([pos, kl_pos[b].to(dev)]) if len(kl_pos[b]) else pos
            if len(pos) == 0:
                continue
            st = CompressorState()
            if self.skip is None:
                ix.compressor(xd[b:b + 1], st, a.inv_freq)
            else:  # the indexer keys as the forward made them: entries after the skip sit `gap` further
                ix.compressor(xd[b:b + 1, :self.skip[0]], st, a.inv_freq)
                ix.compressor(xd[b:b + 1, self.skip[0]:], st, a.inv_freq, self.skip[1])
            ikeys = st.entries.view()[0]  # [N, d_I] from detached input
            N = ikeys.shape[0]
            logits, cq = self._main_logits(x[b], entries[b, :N], pos)  # [H, Q, N]
            cos, sin = rope_cos_sin(a.inv_freq, rope_positions(pos, self.skip), x.dtype)
            iq, iw = ix.queries(xd[b][pos][None], cq.detach()[None], cos, sin)
            iscore = ix.scores(iq, iw, ikeys[None])[0]  # [Q, N]
            visible = torch.arange(N, device=dev)[None] < ((pos + 1) // rate)[:, None]  # [Q, N]
            ok = visible.sum(-1) > 0
            mean_logit = logits.mean(0).masked_fill(~visible, float("-inf"))
            iscore = iscore.masked_fill(~visible, float("-inf"))
            nq = len(qpos)
            if nq:
                tgt = torch.zeros(nq, N, dtype=torch.bool)  # built on the CPU: one copy, not a launch per entry
                for i, (_, ents, *_rest) in enumerate(sup[b]):
                    for e in ents:
                        if 0 <= e < N:
                            tgt[i, e] = True
                tgt = tgt.to(dev) & visible[:nq]
                rows = tgt.any(-1)
                if rows.any():
                    ml, isc, tg = mean_logit[:nq][rows], iscore[:nq][rows], tgt[rows]
                    out["csa_sup"].append(torch.logsumexp(ml, -1) - torch.logsumexp(ml.masked_fill(~tg, float("-inf")), -1))
                    out["idx_sup"].append(torch.logsumexp(isc, -1) - torch.logsumexp(isc.masked_fill(~tg, float("-inf")), -1))
                    with torch.no_grad():
                        k = min(ix.topk, N)
                        top = isc.topk(k, dim=-1).indices
                        out["idx_hit"].append(tg.gather(1, top).any(-1).float())
                        out["csa_top1"].append(tg.gather(1, ml.argmax(-1, keepdim=True))[:, 0].float())
            # slot supervision: head (p mod rate) toward the entry whose own window holds token p
            hs, qs, es = [], [], []
            for i, item in enumerate(sup[b]):
                p = item[2] if len(item) > 2 else None
                # visible[i, p // rate], in Python (no device sync per item)
                if p is not None and p // rate < min(N, (qpos[i] + 1) // rate) and (p % rate) < logits.shape[0]:
                    hs.append(p % rate); qs.append(i); es.append(p // rate)
            if hs:
                hl = logits[torch.tensor(hs, device=dev), torch.tensor(qs, device=dev)]  # [n, N]
                hl = hl.masked_fill(~visible[torch.tensor(qs, device=dev)], float("-inf"))
                out["slot_sup"].append(F.cross_entropy(hl, torch.tensor(es, device=dev), reduction="none"))
            # V3.2 indexer KL toward the (detached) head-averaged main attention over visible entries
            with torch.no_grad():
                p = torch.softmax(logits.detach().masked_fill(~visible[None], float("-inf")), dim=-1).mean(0)
            m = ok & (visible.sum(-1) >= 2)
            if m.any():
                logq = torch.log_softmax(iscore[m], dim=-1)
                pm = p[m]
                kl = (pm * (torch.log(pm.clamp_min(1e-12)) - logq.masked_fill(pm == 0, 0.0))).sum(-1)
                out["idx_kl"].append(kl)
        res = {}
        for k, v in out.items():
            res[k] = torch.cat(v).mean() if v else None
        return res


def rope_positions(pos: torch.Tensor, skip: tuple[int, int] | None) -> torch.Tensor:
    """RoPE positions of token indices `pos` when positions jump by skip[1] at index skip[0]."""
    return pos if skip is None else pos + skip[1] * (pos >= skip[0])


def entry_targets(value_pos: int, query_pos: int, rate: int) -> list[int]:
    """CSA entries that pool token ``value_pos``: its own window's entry and the next one (overlap)."""
    w = value_pos // rate
    return [e for e in (w, w + 1) if e < (query_pos + 1) // rate]


class HCAProbe:
    """Share of an HCA layer's attention that goes to its compressed entries, differentiably, at sampled
    query positions. Training sequences here are short (an HCA layer sees 3 entries at 384 tokens, 8192 at
    1M), and a softmax over more and more entries hands them more and more of the mass: a penalty on that
    share teaches the layer to keep its entries' logits low unless they earn their place, so what it adds
    does not grow with the context."""

    def __init__(self, model, layer: int):
        self.model, self.layer = model, layer
        self.attn = model.layers[layer].attn
        self.x = None
        self.skip = None
        self._h = self.attn.register_forward_pre_hook(self._hook)

    def begin(self, skip: tuple[int, int] | None = None):
        self.x, self.skip = None, skip  # as CSAProbe.begin

    def _hook(self, module, args):
        join = self.skip is not None and self.x is not None and self.x.shape[1] == self.skip[0]
        self.x = torch.cat([self.x, args[0]], dim=1) if join else args[0]

    def entry_mass(self, cache, n_queries: int, g: torch.Generator, as_if_entries: int | None = None
                   ) -> torch.Tensor | None:
        """Mean share of attention on compressed entries. `as_if_entries`: the share they would take if each
        query saw that many entries with the same logits (each entry's weight scaled by as_if / visible):
        a short training sequence then stands in for a 1M-token one."""
        a, x = self.attn, self.x
        B, T, _ = x.shape
        rate, W = a.rate, a.window
        entries = cache.layers[self.layer].kv.entries.view()  # [B, N, d] attached
        if entries is None or T <= rate:
            return None
        dev = x.device
        pos = torch.randint(rate - 1, T, (n_queries,), generator=g).to(dev)  # queries that see >= 1 entry
        cos_all, sin_all = rope_cos_sin(a.inv_freq, rope_positions(torch.arange(T, device=dev), self.skip), x.dtype)
        masses = []
        for b in range(B):
            kv = apply_rope(a.kv_norm(a.wkv(x[b])), cos_all, sin_all)  # [T, d]
            xq = x[b][pos]
            q = unweighted_rms_norm(a.wq_b(a.q_norm(a.wq_a(xq))).view(len(pos), a.n_heads, a.head_dim),
                                    a.cfg.rms_norm_eps)
            q = apply_rope(q, cos_all[pos][:, None], sin_all[pos][:, None])  # [Q, H, d]
            widx = pos[:, None] - torch.arange(W, device=dev)[None]  # [Q, W] window keys (p-W+1 .. p)
            wvalid = widx >= 0
            wk = kv[widx.clamp(min=0)]  # [Q, W, d]
            lw = torch.einsum("qhd,qwd->hqw", q, wk) * a.head_dim ** -0.5
            lw = lw.masked_fill(~wvalid[None], float("-inf"))
            ent = entries[b]
            le = torch.einsum("qhd,nd->hqn", q, ent) * a.head_dim ** -0.5
            visible = torch.arange(ent.shape[0], device=dev)[None] < ((pos + 1) // rate)[:, None]
            le = le.masked_fill(~visible[None], float("-inf"))
            sink = a.attn_sink.float().view(-1, 1, 1).expand(-1, len(pos), 1)
            le = le.float()
            if as_if_entries:
                n_vis = visible.sum(-1).clamp(min=1).float()  # [Q]
                le = le + torch.log(as_if_entries / n_vis)[None, :, None]
            lse_e = torch.logsumexp(le, dim=-1)  # [H, Q]
            lse_all = torch.logsumexp(torch.cat([lw.float(), sink, lse_e[..., None]], dim=-1), dim=-1)
            masses.append(torch.exp(lse_e - lse_all).mean())
        return torch.stack(masses).mean()

    def remove(self):
        self._h.remove()
