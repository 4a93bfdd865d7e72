"""Train the embedded default model ("ds4-tiny"): a small DeepSeek-V4 that finds things in long contexts.

    .venv/bin/python train/train.py --out train/runs/ds4-tiny            # full curriculum (resumes if a checkpoint exists)
    .venv/bin/python train/train.py --out train/runs/smoke --smoke       # a few minutes: does it learn at all?
    .venv/bin/python train/train.py --out train/runs/ds4-tiny --export assets/model   # write the shipped folder
    .venv/bin/python train/train.py --out train/runs/cpu --recipe cpu --threads 2  # all on a CPU (~130 min)

The model is the runtime's own ``runtime.model.Transformer`` built from ``CONFIG`` (a transformers-style
config.json); training calls its ordinary differentiable forward. Losses:

* language modelling on a random share of the haystack/question positions (``--lm-rate``);
* answer tokens (and the closing EOS) of every question, weighted ``--w-answer``;
* retrieval supervision on the CSA layer (train/retrieval_losses.py), for every answer-token query:
  - ``--w-slot``: head ``p mod 4`` of the CSA attention toward the compressed entry whose own window holds
    the value token ``p`` being copied (per-head cross-entropy over the visible entries);
  - ``--w-read``: the answer token read straight off the CSA attention output through the tied output
    head (a short gradient path to the copy circuit: compressor values, ``wo_a``, ``wo_b``);
  - ``--w-idx``: the lightning-indexer scores (on detached inputs) toward the entries holding the value;
  - ``--w-kl``: the DeepSeek-V3.2 indexer KL toward the main attention;
  - ``--w-csa`` (0 by default): the head-mean CSA logits toward those entries;
* copy drills (``RECAP_P`` of the examples, tasks.add_recap): some planted lines are repeated verbatim
  before the question; their values are predicted like answers and supervised like answers.
  Because the repeated lines are never the asked ones, the drill alone teaches that a value right before
  the question is not the answer; the task option ``last_p`` (train/cpu_end.sh) puts the asked needle
  there, with no drill, in that share of needle examples.

Position skips (``--skip-p``, PoSE): in that share of steps the sequence runs as two calls and the RoPE
positions of the second jump ahead by 4,096..``--skip-max`` (``pick_skip``; ``Transformer.hidden``'s
``position_offset``), so a short step trains the relative distances of a long context. Copies from far back
slipped, though the right entry was selected and attended to, because an entry is read as a value too and
RoPE turns its last channels by the query-entry distance: the slot layout below had put half of one slot's
channels there. ``free_rope_channels`` (train/cpu_end.sh phase 4) clears them on a trained model;
``slot_layout(rope_free=True)`` keeps them clear from the start.

Why per-head slots: a CSA entry pools 4 tokens (8 with the overlap) into one vector, so a query that finds
the right entry still has to say *which* of its tokens comes next. The compressor's gate is a softmax over
the window's slots *per channel*, with a learned per-slot bias ``ape``; ``slot_layout`` starts ``ape`` so
that channel group s of an entry holds token s of its window, and the slot loss teaches head s to read
slot s. Without both, 2.3M tokens of training found the needle's entry every time and still copied
nothing (assets/model/MODEL_CARD.md, training history); with them the copy circuit forms in a few hundred
steps.

Recipes (``--recipe``): ``shipped`` is ``STAGES``, the CPU part of the shipped model, which then had GPU phases
(train/gpu_long.sh) and a CPU finish (train/cpu_end.sh); ``cpu`` (``CPU_STAGES``) folds what those taught into
one run: 4,350 steps, 128.5 min of step time on two CPU cores (assets/model/MODEL_CARD.md).

Curriculum (``STAGES``): the first stage runs the CSA layer dense over all compressed entries (the indexer
is detached from the forward; V3.2's dense warm-up) at short length; later stages use the real sparse top-k
at longer lengths. Data and every random draw of step ``s`` come from ``seed`` and ``s`` alone, so a resumed
run is identical to an uninterrupted one. Checkpoints (model, optimiser, step) are written every
``--ckpt-minutes`` and at each stage end; CPU by default, CUDA when available (``--device``).

GPU (``--device cuda``): the step is bound by kernel launches, not arithmetic, so ``--query-block 2048
--score-budget-mb 4096`` (fewer, larger attention blocks; the same outputs, tests/test_cache.py) and
``--workers 8`` (batches built ahead in processes, the same batches) matter; on one H200 a 32,768-token
step took a median 0.60 s and a 65,536-token step ~0.65 s once warm. ``--init-from DIR`` starts from an
exported model with a fresh optimiser; ``--time-budget MIN`` fits the last stage into a time limit (its
fitted length is logged; a resumed run does not refit). train/gpu_long.sh is the GPU run of the model card.

Threads: ``--threads 1`` is the default. On the shared 2-core machine two torch threads were 5-10x *slower*
than one (each op waits for the slower thread when the other core is busy): measured 1.1-1.5k tok/s with one
thread vs 150-300 tok/s with two, for the same step. With nothing else running, two threads pay off: a median of
4.1-4.5 s per 8,192-token step (two runs of 550 and 700 steps) vs about 7 s with one (``--threads 2`` with
``OMP_NUM_THREADS=2``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "train"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from runtime.config import CSA, HCA, SLIDING, ModelConfig  # noqa: E402
from runtime.model import Transformer  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402
from retrieval_losses import CSAProbe, HCAProbe, entry_targets  # noqa: E402
import tasks  # noqa: E402

CONFIG = {
    "model_type": "deepseek_v4",
    "architectures": ["DeepseekV4ForCausalLM"],
    "vocab_size": 8192,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "qk_rope_head_dim": 16,
    "partial_rotary_factor": 0.125,
    "q_lora_rank": 128,
    "o_groups": 2,
    "o_lora_rank": 64,
    "layer_types": [SLIDING, SLIDING, HCA, CSA],
    "compress_rates": {CSA: 4, HCA: 128},
    "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"],
    "moe_intermediate_size": 128,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "sliding_window": 128,
    "index_n_heads": 4,
    "index_head_dim": 64,
    "index_topk": 64,
    "hc_mult": 2,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "max_position_embeddings": 2097152,
    "num_nextn_predict_layers": 0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 4,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}

# (name, steps, seq_len, batch, dense_csa, lr_peak, options). Options: "sched" = (offset, length) places the
# stage inside a longer warmup+cosine schedule (so a stage can change loss weights mid-schedule); any other
# key overrides the command-line loss weight of that name for the stage.
STAGES = [
    # the copy circuit forms fastest on needles alone (numeric values of 4-8 digits), then all three skills,
    # then needles again (up to 6 per example, as many as the evaluation plants) while the rate anneals
    ("niah-320", 1000, 320, 4, True, 2e-3, {"mix": [["niah", 1.0]], "task": {"value_fmt": "number:4-8",
                                                                         "max_needles": 4}}),
    ("mix-384", 600, 384, 4, True, 1.5e-3, {"sched": (0, 2600)}),
    ("niah-384", 800, 384, 4, True, 1e-3, {"mix": [["niah", 0.85], ["kv", 0.15]], "sched": (0, 1200),
                                           "task": {"value_fmt": "number", "max_needles": 6}}),
    # long sequences last: the HCA layer must meet many entries (32 at 4,096 tokens, not 3 at 384) and the
    # CSA layer the real top-k, or accuracy falls with length; the HCA penalty (HCAProbe) keeps the share
    # of attention its entries take from growing with their number
    ("sparse-1024", 200, 1024, 2, False, 5e-4, {"mix": [["niah", 0.7], ["kv", 0.2], ["continue", 0.1]],
                                                "w_hca": 2.0}),
    ("sparse-4096", 150, 4096, 1, False, 4e-4, {"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0,
                                                "task": {"value_fmt": "number", "max_needles": 6}}),
    # more of the long, sparse regime (copy precision fell with length: single-digit slips at 32k), with a
    # fifth of the needles on the haystack's first or last line (the last one sits in the sliding window)
    ("long-4096", 700, 4096, 1, False, 3e-4, {"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0,
                                              "task": {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2}}),
    ("long-8192", 300, 8192, 1, False, 2e-4, {"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0,
                                              "task": {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2}}),
    # the same regime again: each earlier long stage lifted 32k/128k accuracy while answer-token accuracy
    # stayed ~0.85, so more steps at the longest affordable length
    ("long-8192b", 700, 8192, 1, False, 2e-4, {"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0,
                                               "task": {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2}}),
    # then 200 steps of it at a low peak rate (a restart at 1.5e-4 lost 32k accuracy; see the model card)
    ("long-8192c", 200, 8192, 1, False, 3e-5, {"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0,
                                               "task": {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2}}),
]
# The CPU recipe (``--recipe cpu``): the whole run on a 2-core CPU in about 130 minutes, no GPU phases, no
# separate finish. The first five stages are STAGES' own; what the shipped model learnt in its GPU phases and
# CPU finish is folded into the long stages from the start: the slot layout keeps RoPE's channels free
# (slot_layout rope_free, instead of free_rope_channels later), half the steps skip 4k-256k RoPE positions
# between the asked value and the question (PoSE: far distances at 4,096-8,192 tokens' cost), and 30% of
# needle examples put the asked needle right before the question (``last_p``, instead of cpu_end.sh phase 1).
_LONG = {"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0, "skip_p": 0.5, "skip_max": 262144,
         "task": {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2, "last_p": 0.3}}
CPU_STAGES = STAGES[:5] + [
    ("long-4096", 700, 4096, 1, False, 3e-4, _LONG),
    ("long-8192", 300, 8192, 1, False, 2e-4, _LONG),
    ("anneal-4096", 600, 4096, 1, False, 1e-4, _LONG),
]
RECIPES = {"shipped": (STAGES, {"ape_slots": 5.0}), "cpu": (CPU_STAGES, {"ape_slots": 5.0, "rope_free": True})}
SMOKE_STAGES = [("smoke-dense-384", 120, 384, 4, True, 2e-3, {}), ("smoke-sparse-512", 20, 512, 2, False, 1e-3, {})]
MIX = (("niah", 0.7), ("kv", 0.2), ("continue", 0.1))
RECAP_P = 0.6  # share of training examples with a copy drill (tasks.add_recap)
INIT: dict = {"ape_slots": 5.0}  # structured init (see slot_layout)
TASK_OPTS: dict = {"value_fmt": "number", "max_needles": 4}  # niah: numeric values (RULER-style passkeys)
PAD = 4


# --------------------------------------------------------------------------------------------- model
def build_model(seed: int) -> Transformer:
    model = Transformer(ModelConfig.from_dict(CONFIG)).init_weights(seed)
    with torch.no_grad():
        if INIT.get("ape_slots"):
            slot_layout(model, INIT["ape_slots"], INIT.get("rope_free", False))
    if CONFIG["tie_word_embeddings"]:
        model.head.weight = model.embed.weight
    return model


def slot_layout(model: Transformer, strength: float, rope_free: bool = False) -> None:
    """Start each CSA compressor's per-channel slot bias (``ape``) as a layout: channel group s of an entry
    takes token s of its window, so an entry begins as the concatenation of its tokens' projections
    instead of a random per-channel mix. (The previous window's half starts switched off.)

    rope_free: the groups share the channels RoPE leaves alone, and the last qk_rope_head_dim channels pool
    the window evenly. Without it the last group straddles them: entries are values too, and RoPE turns
    those channels by the query-entry distance, so that slot's token reads right only at distances
    trained (the shipped model: every 32k miss of seeds 0-2 was a token at slot 3; free_rope_channels)."""
    for blk in model.layers:
        comp = blk.attn.compressor
        if blk.attn.indexer is None or comp is None:
            continue
        r, d = comp.rate, comp.dim
        w = d - model.config.qk_rope_head_dim if rope_free else d
        ape = torch.full((r, 2 * d), -strength)
        for s in range(r):
            ape[s, d + s * w // r: d + (s + 1) * w // r] = strength
        ape[:, d:][ape[:, d:] < 0] = 0.0
        comp.ape.copy_(ape)


def free_rope_channels(model: Transformer) -> None:
    """On a trained model: make each CSA compressor pool its RoPE channels evenly over the current window
    (slot bias and gate projection zeroed there; the previous window's half at the lowest bias that half has
    elsewhere, -5.8 in the model it was first applied to), so no token's content rides on them; training then
    moves what they held to the other channels (train/cpu_end.sh, phase 4)."""
    R = model.config.qk_rope_head_dim
    for blk in model.layers:
        comp = blk.attn.compressor
        if blk.attn.indexer is None or comp is None:
            continue
        d = comp.dim
        comp.ape[:, 2 * d - R:] = 0.0
        comp.wgate.weight[2 * d - R:] = 0.0
        comp.ape[:, d - R:d] = comp.ape[:, :d].min()  # the previous window's half stays switched off there
        comp.wgate.weight[d - R:d] = 0.0


def export_state(model: Transformer) -> dict:
    """State dict with the official names, every tensor its own storage (tied head cloned)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


@contextmanager
def dense_csa(model: Transformer, on: bool):
    """Run CSA layers dense over all compressed entries (indexer detached) while ``on``."""
    saved = []
    if on:
        for blk in model.layers:
            if blk.attn.indexer is not None:
                saved.append((blk.attn, blk.attn.indexer))
                blk.attn.indexer = None
    try:
        yield
    finally:
        for attn, ix in saved:
            attn.indexer = ix


class BiasBalancer:
    """DeepSeek-V3/V4 auxiliary-loss-free balancing: nudge each score-routed gate's selection bias."""

    def __init__(self, model, gamma: float = 1e-3):
        self.gamma, self.counts, self.hooks = gamma, {}, []
        for name, mod in model.named_modules():
            if mod.__class__.__name__ == "Gate" and not mod.hashed:
                self.hooks.append(mod.register_forward_hook(self._hook))
                self.counts[mod] = torch.zeros(mod.weight.shape[0])

    def _hook(self, mod, args, out):
        self.counts[mod] += torch.bincount(out[1].flatten().cpu(), minlength=len(self.counts[mod])).float()

    @torch.no_grad()
    def update(self):
        for mod, c in self.counts.items():
            if c.sum() > 0:
                mod.bias += self.gamma * torch.sign(c.mean() - c).to(mod.bias.device)
            c.zero_()


# --------------------------------------------------------------------------------------------- data
def step_rng(seed: int, step: int, salt: int = 0) -> random.Random:
    return random.Random(seed * 1_000_003 + step * 7919 + salt)


def make_batch(step_seed: random.Random, pool, tok, T: int, B: int, lm_rate: float, variant: str = "train",
               recap: bool = True, mix=None, task_opts=None):
    """Token ids [B, T] plus loss bookkeeping for one batch of fresh examples."""
    ids = torch.full((B, T), PAD, dtype=torch.long)
    lm_pos, ans, meta = [], [], []
    for b in range(B):
        for attempt in range(20):
            r = step_seed.random()
            kind = next(k for k, c in _cum(mix or MIX) if r < c)
            ex = tasks.make_example(kind, step_seed, pool, T - 8 - 6 * attempt - (60 if recap else 0), variant,
                                    **(TASK_OPTS if task_opts is None else task_opts))
            if recap and step_seed.random() < RECAP_P and not ex.no_recap:
                tasks.add_recap(ex, step_seed)
            ex = tasks.render(ex, tok)
            if len(ex.ids) <= T:
                break
        else:
            raise RuntimeError("could not fit an example")
        n = len(ex.ids)
        ids[b, :n] = torch.tensor(ex.ids)
        # answer bookkeeping: position t predicts ids[t+1]; sup targets for the CSA layer
        a_pos, a_tgt, sup = [], [], []
        ans_set = set()
        for qa in ex.qas:
            s, e = qa.answer_tokens  # answer tokens + EOS at ids[s:e]
            vs, ve = qa.value_tokens
            same = ex.ids[vs:ve] == ex.ids[s:e - 1]
            for j, t in enumerate(range(s - 1, e - 1)):
                a_pos.append(t)
                a_tgt.append(ex.ids[t + 1])
                ans_set.add(t)
                if same:
                    vp = [vs + min(j, ve - vs - 1)]
                else:
                    vp = list(range(vs, ve))
                ents = sorted({w for p in vp for w in entry_targets(p, t, 4)})
                if ents:
                    sup.append((t, ents, vp[0] if len(vp) == 1 else None))
        for a, b, c, d in ex.copy_tokens:  # recap copies: like answers, supervised toward the source entries
            for j, t in enumerate(range(c - 1, d - 1)):
                if t in ans_set or t < 0:
                    continue
                a_pos.append(t)
                a_tgt.append(ex.ids[t + 1])
                ans_set.add(t)
                ents = entry_targets(a + j, t, 4)
                if ents:
                    sup.append((t, ents, a + j))
        g = torch.Generator().manual_seed(step_seed.randrange(1 << 30))
        cand = torch.arange(n - 1)
        keep = torch.rand(n - 1, generator=g) < lm_rate
        lp = [int(t) for t in cand[keep] if int(t) not in ans_set]
        lm_pos.append(lp)
        ans.append((a_pos, a_tgt, sup))
        # a position skip (pick_skip) goes between the first asked item's value and the first answered token
        src = ex.qas[0].value_tokens[1] if ex.qas and ex.qas[0].value_tokens else 0
        meta.append({"kind": ex.kind, "n": n, "nq": len(ex.qas), "src_end": src, "first_ans": min(a_pos, default=n)})
    return ids, lm_pos, ans, meta


class BatchWorkers:
    """Processes that build a stage's batches ahead of its steps. A batch and its KL seed depend on (seed,
    step) alone, exactly as in the serial loop, so a run is the same with or without workers."""

    def __init__(self, n: int, pool, tok, seed: int):
        import multiprocessing as mp
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's thread pool must not cross fork()
        self.procs = mp.get_context("fork").Pool(n, initializer=_worker_init, initargs=(pool, tok, seed))

    def stage(self, start: int, end: int, T: int, B: int, lm_rate: float, mix, task):
        return self.procs.imap(_worker_batch, [(s, T, B, lm_rate, mix, task) for s in range(start, end)])

    def close(self):
        self.procs.terminate()


_W: dict = {}


def _worker_init(pool, tok, seed):
    torch.set_num_threads(1)
    _W.update(pool=pool, tok=tok, seed=seed)


def _worker_batch(job):
    step, T, B, lm_rate, mix, task = job
    rng = step_rng(_W["seed"], step)
    ids, lm_pos, ans, meta = make_batch(rng, _W["pool"], _W["tok"], T, B, lm_rate, mix=mix, task_opts=task)
    return ids, lm_pos, ans, meta, rng.randrange(1 << 30)


def _cum(mix):
    c, out = 0.0, []
    for k, w in mix:
        c += w
        out.append((k, c))
    out[-1] = (out[-1][0], 1.01)
    return out


def kl_positions(g: torch.Generator, n_valid: int, k: int, min_pos: int = 64) -> torch.Tensor:
    if n_valid <= min_pos:
        return torch.zeros(0, dtype=torch.long)
    return torch.randint(min_pos, n_valid, (k,), generator=g).unique()


# --------------------------------------------------------------------------------------------- step
def pick_skip(g: random.Random, meta: list[dict], p: float, max_skip: int, align: int = 128):
    """(index, positions skipped) or None: with probability p, RoPE positions jump by a log-uniform
    4,096..max_skip (a multiple of `align`) at an `align`-multiple index between the first asked item's
    value and the first answered token (anywhere before that token if there is no room), so an 8k-token
    sequence carries the relative distances of a 32k-1M one (PoSE). Same index for all rows."""
    if not p or g.random() >= p:
        return None
    hi = (min(m["first_ans"] for m in meta) - 64) // align  # the question (~30 tokens) stays after the skip
    lo = -(-max(m["src_end"] for m in meta) // align)  # first multiple of align at or after the value's end
    if hi < 1:
        return None
    at = g.randint(lo if 1 <= lo <= hi else 1, hi) * align
    return at, int(math.exp(g.uniform(math.log(4096), math.log(max_skip)))) // align * align


def forward_losses(model, probe, ids, lm_pos, ans, args, kl_seed: int, device, hca_probe=None, meta=None):
    B, T = ids.shape
    cache = model.new_cache(B)
    skip = pick_skip(random.Random(kl_seed + 2), meta, args.skip_p, args.skip_max) if meta else None
    for pr in (probe, hca_probe):
        if pr is not None:
            pr.begin(skip)
    if skip is None:
        h = model.hidden(ids.to(device), cache)  # [B, T, D]
    else:
        s, gap = skip
        x = ids.to(device)
        h = torch.cat([model.hidden(x[:, :s], cache), model.hidden(x[:, s:], cache, position_offset=gap)], dim=1)
    rows, cols, tg, wts = [], [], [], []
    n_lm = sum(len(p) for p in lm_pos)
    n_ans = sum(len(a[0]) for a in ans)
    for b in range(B):
        for t in lm_pos[b]:
            rows.append(b); cols.append(t); tg.append(int(ids[b, t + 1])); wts.append(1.0 / max(1, n_lm))
        for t, y in zip(ans[b][0], ans[b][1]):
            rows.append(b); cols.append(t); tg.append(y); wts.append(args.w_answer / max(1, n_ans))
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    logits = model.head(h[rows.to(device), cols.to(device)]).float()
    tg = torch.tensor(tg, device=device)
    ce = F.cross_entropy(logits, tg, reduction="none")
    wts = torch.tensor(wts, device=device)
    is_ans = torch.zeros_like(wts, dtype=torch.bool)
    is_ans[n_lm_split(lm_pos, ans).to(device)] = True
    loss = (ce * wts).sum()
    stats = {"lm": ce[~is_ans].mean().item() if (~is_ans).any() else float("nan"),
             "ans": ce[is_ans].mean().item() if is_ans.any() else float("nan")}
    with torch.no_grad():
        pred = logits.argmax(-1)
        stats["ans_tok_acc"] = (pred[is_ans] == tg[is_ans]).float().mean().item() if is_ans.any() else float("nan")
    if args.w_read and is_ans.any():
        ai = is_ans.nonzero()[:, 0]
        read = F.cross_entropy(probe.read_logits(rows.to(device)[ai], cols.to(device)[ai]), tg[ai])
        loss = loss + args.w_read * read
        stats["read"] = read.item()
    g = torch.Generator().manual_seed(kl_seed)
    klp = [kl_positions(g, int((ids[b] != PAD).sum()) - 1, args.kl_queries) for b in range(B)]
    aux = probe.losses(cache, [a[2] for a in ans], klp)
    for name, w in (("csa_sup", args.w_csa), ("idx_sup", args.w_idx), ("idx_kl", args.w_kl),
                    ("slot_sup", args.w_slot)):
        if aux[name] is not None:
            loss = loss + w * aux[name]
            stats[name] = aux[name].item()
    for name in ("idx_hit", "csa_top1"):
        if aux[name] is not None:
            stats[name] = aux[name].item()
    if skip is not None:
        stats["skip"] = float(skip[1])
    if hca_probe is not None and args.w_hca:
        mass = hca_probe.entry_mass(cache, 32, torch.Generator().manual_seed(kl_seed + 1),
                                    as_if_entries=args.hca_as_if or None)
        if mass is not None:
            loss = loss + args.w_hca * mass
            stats["hca_mass"] = mass.item()
    stats["loss"] = loss.item()
    return loss, stats


def n_lm_split(lm_pos, ans):
    """Indices (in the row order of forward_losses) that are answer rows."""
    idx, k = [], 0
    for b in range(len(lm_pos)):
        k += len(lm_pos[b])
        idx.extend(range(k, k + len(ans[b][0])))
        k += len(ans[b][0])
    return torch.tensor(idx, dtype=torch.long)


def lr_at(step_in_stage: int, steps: int, peak: float, warmup: int = 30) -> float:
    if step_in_stage < warmup:
        return peak * (step_in_stage + 1) / warmup
    prog = (step_in_stage - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


# --------------------------------------------------------------------------------------------- eval during training
@torch.no_grad()
def quick_eval(model, pool, tok, T: int, n: int, seed: int, dense: bool, device) -> dict:
    """Held-out, teacher-forced: share of questions whose every answer token is the argmax, and indexer
    recall of the value's entries in the real top-k (sparse forward) at the first answer query."""
    model.eval()
    rng = random.Random(seed)
    exact, total, by_kind = 0, 0, {}
    for i in range(n):
        ids, lm_pos, ans, meta = make_batch(rng, pool, tok, T, 1, 0.0, variant="eval", recap=False)
        with dense_csa(model, dense):
            logits = model(ids.to(device))[0]
        a_pos, a_tgt, _ = ans[0]
        ex_ok = []
        # split per question: contiguous runs of positions
        runs, cur = [], []
        for t, y in zip(a_pos, a_tgt):
            if cur and t != cur[-1][0] + 1:
                runs.append(cur); cur = []
            cur.append((t, y))
        if cur:
            runs.append(cur)
        for run in runs:
            ok = all(int(logits[t].argmax()) == y for t, y in run)
            exact += ok; total += 1
            k = meta[0]["kind"]
            by_kind.setdefault(k, [0, 0]); by_kind[k][0] += ok; by_kind[k][1] += 1
    model.train()
    out = {"tf_exact": exact / max(1, total), "n": total}
    out.update({f"tf_{k}": v[0] / max(1, v[1]) for k, v in by_kind.items()})
    return out


# --------------------------------------------------------------------------------------------- main
def save_ckpt(path: Path, model, opt, step: int, extra: dict):
    tmp = path.with_suffix(".tmp")
    torch.save({"model": export_state(model), "opt": opt.state_dict(), "step": step, "extra": extra}, tmp)
    os.replace(tmp, path)


def export(model, out_dir: Path, shard_mb: float = 0):
    """config.json, tokenizer.json and the weights: one model.safetensors, or with ``shard_mb`` several
    files of at most that size (runtime.load_model reads every *.safetensors of a folder)."""
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    state = export_state(model)
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        nb = v.numel() * v.element_size()
        if shard_mb and cur and size + nb > shard_mb * 2**20:
            shards.append(cur); cur, size = {}, 0
        cur[k] = v; size += nb
    shards.append(cur)
    for i, part in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(out_dir / name), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    shutil.copyfile(REPO / "assets" / "tokenizer.json", out_dir / "tokenizer.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "train" / "runs" / "ds4-tiny"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--smoke", action="store_true", help="tiny curriculum to check that learning starts")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="shipped",
                    help="stages and initial layout: 'shipped' (STAGES, then the GPU phases and CPU finish of "
                         "the model card) or 'cpu' (CPU_STAGES: everything in one CPU run)")
    ap.add_argument("--pool-bytes", type=int, default=16_000_000, help="train-split text for haystacks")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is several times faster than 2 on the shared 2-core machine")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lm-rate", type=float, default=0.02)
    ap.add_argument("--w-answer", type=float, default=4.0)
    ap.add_argument("--w-csa", type=float, default=0.0)
    ap.add_argument("--w-idx", type=float, default=2.0)
    ap.add_argument("--w-kl", type=float, default=0.5)
    ap.add_argument("--w-read", type=float, default=2.0,
                    help="CE of the answer token read straight off the CSA attention output (copy-circuit aid)")
    ap.add_argument("--w-slot", type=float, default=3.0,
                    help="per-head CE: head (p mod rate) of the CSA layer toward the entry of token p being copied")
    ap.add_argument("--w-hca", type=float, default=0.0,
                    help="penalty on the HCA layer's attention share on its compressed entries (length robustness)")
    ap.add_argument("--hca-as-if", type=int, default=0,
                    help="with --w-hca: penalise the share the HCA entries would take if there were this many")
    ap.add_argument("--skip-p", type=float, default=0.0,
                    help="share of steps whose RoPE positions skip ahead between the asked value and the question (PoSE)")
    ap.add_argument("--skip-max", type=int, default=262144, help="with --skip-p: the longest skip")
    ap.add_argument("--kl-queries", type=int, default=48)
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this global step (for staged runs)")
    ap.add_argument("--export", default=None, help="write config/safetensors/tokenizer of the checkpoint here and exit")
    ap.add_argument("--export-stages", default=None,
                    help="also export each stage's end (and a --time-budget stop) to DIR/step<N>/, sharded")
    ap.add_argument("--shard-mb", type=float, default=0, help="with --export(-stages): safetensors files of at most this size")
    ap.add_argument("--init-from", default=None,
                    help="start from this model folder's weights (fresh optimiser, step 0 of the stages)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="minutes of training: the last stage is shortened, once its warm-up is timed, so that "
                         "the run ends within the budget with its whole cosine; any stage stops at the budget")
    ap.add_argument("--workers", type=int, default=0, help="processes that build batches ahead of the steps")
    ap.add_argument("--query-block", type=int, default=None,
                    help="queries per attention block (runtime default 128; larger = fewer kernels on a GPU)")
    ap.add_argument("--score-budget-mb", type=int, default=None,
                    help="fp32 scratch per attention block (runtime default 256 MB; caps the query block)")
    ap.add_argument("--experiment", default=None, help="JSON overrides for experiments: "
                    '{"mix": [["niah", 1.0]], "task": {"max_needles": 1}, "stages": [[name, steps, T, B, dense, lr, {}]]}')
    args = ap.parse_args(argv)
    global MIX, TASK_OPTS, RECAP_P, INIT
    recipe_stages, INIT = RECIPES[args.recipe]
    stages_override = None
    if args.experiment:
        exp = json.loads(args.experiment)
        MIX = tuple(tuple(x) for x in exp.get("mix", MIX))
        TASK_OPTS = exp.get("task", {})
        RECAP_P = exp.get("recap_p", RECAP_P)
        INIT = exp.get("init", INIT)
        stages_override = [tuple(x) for x in exp["stages"]] if "stages" in exp else None
        CONFIG.update(exp.get("config", {}))

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    device = torch.device(args.device)
    stages = stages_override or (SMOKE_STAGES if args.smoke else recipe_stages)

    tok = Tokenizer.default()
    t0 = time.time()
    pool = heldout = None
    if not args.export:
        pool = tasks.TokenPool.corpus("train", args.pool_bytes, tok, cache_dir=REPO / "train" / "runs")
        heldout = tasks.TokenPool.corpus("heldout", 3_000_000, tok, cache_dir=REPO / "train" / "runs")
        print(f"pools: train {len(pool)} tokens, heldout {len(heldout)} tokens ({time.time() - t0:.0f}s)", flush=True)
    # batch workers fork before any CUDA work (a forked child must not inherit a live CUDA context)
    batches = BatchWorkers(args.workers, pool, tok, args.seed) if args.workers and pool else None

    torch.manual_seed(args.seed)
    model = build_model(args.seed)
    if args.init_from and not ckpt_path.is_file():
        from safetensors.torch import load_file
        state = {}
        for f in sorted(Path(args.init_from).glob("*.safetensors")):
            state.update(load_file(str(f)))
        model.load_state_dict(state, strict=True)
        if CONFIG["tie_word_embeddings"]:
            model.head.weight = model.embed.weight
        if INIT.get("free_rope_channels"):
            with torch.no_grad():
                free_rope_channels(model)
        print(f"initialised from {args.init_from}" + (" (RoPE channels freed)" if INIT.get("free_rope_channels") else ""),
              flush=True)
    model = model.to(device)
    for blk in model.layers:
        if args.query_block:
            blk.attn.query_block = args.query_block
        if args.score_budget_mb:
            blk.attn.score_budget = args.score_budget_mb << 20
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-8)
    step = 0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        missing = model.load_state_dict(ck["model"], strict=True)
        if CONFIG["tie_word_embeddings"]:
            model.head.weight = model.embed.weight
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
    if args.export:
        export(model, Path(args.export), args.shard_mb)
        print(f"exported step {step} to {args.export}")
        return 0

    csa_layer = next(i for i, t in enumerate(model.config.layer_types) if t == CSA)
    probe = CSAProbe(model, csa_layer)
    hca_layer = next((i for i, t in enumerate(model.config.layer_types) if t == HCA), None)
    hca_probe = HCAProbe(model, hca_layer) if hca_layer is not None else None
    balancer = BiasBalancer(model)
    log = open(out / "log.jsonl", "a")
    model.train()
    total_steps = sum(s[1] for s in stages)
    last_ckpt = t_start = time.time()
    deadline = t_start + args.time_budget * 60 if args.time_budget else None
    begin = 0
    base_args = vars(args).copy()

    def stop(name: str, why: str) -> int:
        save_ckpt(ckpt_path, model, opt, step, {"stage": name})
        if args.export_stages:
            export(model, Path(args.export_stages) / f"step{step}", args.shard_mb)
        print(f"stopped at step {step} ({why})", flush=True)
        if batches:
            batches.close()
        return 0

    for si, (name, steps, T, B, dense, lr_peak, opts) in enumerate(stages):
        end = begin + steps
        sched_off, sched_len = opts.get("sched", (0, steps))
        for k, v in base_args.items():  # per-stage loss-weight overrides ("mix" and "task": data overrides)
            setattr(args, k, opts.get(k, v))
        feed = None
        if batches and step < end:
            feed = batches.stage(step, end, T, B, args.lm_rate, opts.get("mix"), opts.get("task"))
        stage_secs = []
        while step < end:
            if args.max_steps is not None and step >= args.max_steps:
                return stop(name, "--max-steps")
            if deadline and time.time() > deadline:
                return stop(name, "--time-budget")
            ts = time.time()
            lr = lr_at(step - begin + sched_off, sched_len, lr_peak)
            for gparam in opt.param_groups:
                gparam["lr"] = lr
            if feed is not None:
                ids, lm_pos, ans, meta, kl_seed = next(feed)
            else:
                rng = step_rng(args.seed, step)
                ids, lm_pos, ans, meta = make_batch(rng, pool, tok, T, B, args.lm_rate, mix=opts.get("mix"),
                                                    task_opts=opts.get("task"))
                kl_seed = rng.randrange(1 << 30)
            with dense_csa(model, dense):
                loss, st = forward_losses(model, probe, ids, lm_pos, ans, args, kl_seed, device, hca_probe, meta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            opt.step()
            balancer.update()
            step += 1
            dt = time.time() - ts
            stage_secs.append(dt)
            if (deadline and si == len(stages) - 1 and step - begin == 20 and "sched" not in opts
                    and sched_len == steps):
                # the last stage's length fitted to the budget while still in warm-up (which does not
                # depend on the stage length): its cosine then runs to the end
                per = sorted(stage_secs[5:])[len(stage_secs[5:]) // 2] * 1.08  # median, +8% for evals
                fit = 20 + int((deadline - time.time()) / per)
                if fit < steps:
                    end, sched_len = begin + max(fit, 31), max(fit, 31)
                    print(f"--time-budget: stage {name} shortened to {sched_len} steps", flush=True)
                    log.write(json.dumps({"stage": name, "fitted_steps": sched_len, "step": step}) + "\n")
            rec = {"step": step, "stage": name, "T": T, "B": B, "lr": lr, "gnorm": gn, "sec": dt,
                   "tok_s": B * T / dt, "kinds": [m["kind"] for m in meta], **{k: round(v, 4) for k, v in st.items()}}
            log.write(json.dumps(rec) + "\n"); log.flush()
            if step % 5 == 0 or step == 1:
                print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                               if k not in ("kinds",)), flush=True)
            if args.eval_every and (step % args.eval_every == 0 or step == end):
                ev = quick_eval(model, heldout, tok, T, args.eval_n, 99, dense, device)
                ev.update(step=step, stage=name, eval=True)
                log.write(json.dumps(ev) + "\n"); log.flush()
                print("EVAL", json.dumps(ev), flush=True)
            if time.time() - last_ckpt > args.ckpt_minutes * 60 or step == end:
                save_ckpt(ckpt_path, model, opt, step, {"stage": name})
                if step == end:  # each stage's end stays on disk (to export or resume from)
                    shutil.copyfile(ckpt_path, out / f"ckpt-step{step}.pt")
                    if args.export_stages:
                        export(model, Path(args.export_stages) / f"step{step}", args.shard_mb)
                last_ckpt = time.time()
        begin = end
    save_ckpt(ckpt_path, model, opt, step, {"stage": "done"})
    if batches:
        batches.close()
    print(f"done: {step}/{total_steps} steps ({(time.time() - t_start) / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
