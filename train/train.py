"""Train the embedded default model ("ds4-tiny"): a small DeepSeek-V4 that finds things in long contexts.

    .venv/bin/python train/train.py --recipe shipped --out train/runs/shipped     # every phase of the shipped model
    .venv/bin/python train/train.py --recipe cpu --out train/runs/cpu --threads 2  # all on a CPU (~130 min)
    .venv/bin/python train/train.py --recipe smoke --out train/runs/smoke          # minutes: does it learn at all?
    .venv/bin/python train/train.py --recipe shipped --out train/runs/shipped --export assets/model  # a checkpoint
    .venv/bin/python train/train.py --list                                         # the recipes and their phases

Recipes are data (train/recipes.py): a recipe chains *phases*; a phase is one training run (fresh optimiser,
its own data seed) over *stages* (steps at one length, each with its warm-up + cosine learning rate).
A recipe of several phases runs each in ``OUT/<phase>/`` and exports its end to ``OUT/<phase>/model/``,
which the next phase starts from; a one-phase recipe runs in ``OUT/`` itself. Rerunning the same command
after an interruption goes on where it stopped: finished phases (``model/`` present) are skipped and the
phase under way resumes from its ``checkpoint.pt``. ``--phases a,b`` runs only those (the first from
``--init-from DIR`` when the phase before it has no export in OUT). ``--recipe shipped`` runs, in order:
cpu (4,650 steps) -> gpu-1 (16k, 32k tokens) -> gpu-2 (64k) -> end-1 (4k, 8k) -> end-4 (4k); its model is
``OUT/end-4/model`` (assets/model/MODEL_CARD.md, "How it was trained").

GPU phases (gpu-1, gpu-2) run on CUDA. Without one the command stops before them (exit status 3) and says
so: rerun it on a CUDA machine with OUT copied over (and train/runs/pool_*.npy, the cached token pools, if
that machine lacks the corpus; ``bench/cuda_parity.py --model OUT/cpu/model`` checks its logits against the
CPU's first), or add ``--gpu-phases-on-cpu`` to run them on the CPU as the former cpu_long.sh did: the same
stages and data with two threads, hours each (gpu-1 measured 20 s per step at ~17.5 GB resident; gpu-2's
65,536-token steps need about twice that memory). The CPU phases ran with ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=100000000000`` in the environment (glibc; speed only).

The model is the runtime's own ``runtime.model.Transformer`` built from the recipe's config (train/recipes.py
CONFIG, a transformers-style config.json); training calls its ordinary differentiable forward. Losses:

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
* copy drills (the phase's ``recap_p`` of the examples, tasks.add_recap): some planted lines are repeated
  verbatim before the question; their values are predicted like answers and supervised like answers.
  Because the repeated lines are never the asked ones, the drill alone teaches that a value right before
  the question is not the answer; the task option ``last_p`` (phase end-1) puts the asked needle there,
  with no drill, in that share of needle examples.

A stage may set any of these for itself (``Stage.settings``, e.g. ``w_hca``, ``skip_p``).

Position skips (``--skip-p``, PoSE): in that share of steps the sequence runs as two calls and the RoPE
positions of the second jump ahead by 4,096..``--skip-max`` (``pick_skip``; ``Transformer.hidden``'s
``position_offset``), so a short step trains the relative distances of a long context. Copies from far back
slipped, though the right entry was selected and attended to, because an entry is read as a value too and
RoPE turns its last channels by the query-entry distance: the slot layout below had put half of one slot's
channels there. ``free_rope_channels`` (phase end-4) clears them on a trained model;
``slot_layout(rope_free=True)`` keeps them clear from the start (recipe cpu).

Why per-head slots: a CSA entry pools 4 tokens (8 with the overlap) into one vector, so a query that finds
the right entry still has to say *which* of its tokens comes next. The compressor's gate is a softmax over
the window's slots *per channel*, with a learned per-slot bias ``ape``; ``slot_layout`` starts ``ape`` so
that channel group s of an entry holds token s of its window, and the slot loss teaches head s to read
slot s. Without both, 2.3M tokens of training found the needle's entry every time and still copied
nothing (assets/model/MODEL_CARD.md, training history); with them the copy circuit forms in a few hundred
steps.

Data and every random draw of step ``s`` come from the phase's seed and ``s`` alone, so a resumed run is
identical to an uninterrupted one. Checkpoints (model, optimiser, step) are written every ``--ckpt-minutes``
and at each stage end; CPU by default, CUDA when available (``--device``).

GPU: the step is bound by kernel launches, not arithmetic, so the GPU phases run with ``--query-block 2048
--score-budget-mb 4096`` (fewer, larger attention blocks; the same outputs, tests/test_cache.py) and
``--workers 8`` (batches built ahead in processes, the same batches); on one H200 a 32,768-token step took a
median 0.60 s and a 65,536-token step ~0.65 s once warm. ``--init-from DIR`` starts the first phase from an
exported model with a fresh optimiser; ``--time-budget MIN`` fits each phase's last stage into a time limit
(its fitted length is logged; a resumed run does not refit).

Threads: ``--threads 1`` is the default (a phase's ``run`` may say otherwise; the command line wins). On the
shared 2-core machine two torch threads were 5-10x *slower* than one (each op waits for the slower thread when
the other core is busy): measured 1.1-1.5k tok/s with one thread vs 150-300 tok/s with two, for the same step.
With nothing else running, two threads pay off: a median of 4.1-4.5 s per 8,192-token step (two runs of 550
and 700 steps) vs about 7 s with one (``--threads 2`` with ``OMP_NUM_THREADS=2``).
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
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "train"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from runtime.config import CSA, HCA, ModelConfig  # noqa: E402
from runtime.model import Transformer  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402
from recipes import (CONFIG, DEFAULT_MIX, DEFAULT_TASK, RECAP_P, RECIPES, RUN_DEFAULTS, Init, Phase,  # noqa: E402
                     Recipe, Stage)
from retrieval_losses import CSAProbe, HCAProbe, entry_targets  # noqa: E402
import tasks  # noqa: E402

PAD = 4


# --------------------------------------------------------------------------------------------- model
def build_model(seed: int, init: Init = Init(), config: dict = CONFIG) -> Transformer:
    model = Transformer(ModelConfig.from_dict(dict(config))).init_weights(seed)
    with torch.no_grad():
        if init.ape_slots:
            slot_layout(model, init.ape_slots, init.rope_free)
    if config["tie_word_embeddings"]:
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
    moves what they held to the other channels (recipe phase end-4)."""
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
               recap: bool = True, mix=None, task_opts=None, recap_p: float = RECAP_P):
    """Token ids [B, T] plus loss bookkeeping for one batch of fresh examples (``mix`` and ``task_opts``:
    the recipes' defaults when None)."""
    ids = torch.full((B, T), PAD, dtype=torch.long)
    lm_pos, ans, meta = [], [], []
    for b in range(B):
        for attempt in range(20):
            r = step_seed.random()
            kind = next(k for k, c in _cum(mix or DEFAULT_MIX) if r < c)
            ex = tasks.make_example(kind, step_seed, pool, T - 8 - 6 * attempt - (60 if recap else 0), variant,
                                    **(DEFAULT_TASK if task_opts is None else task_opts))
            if recap and step_seed.random() < recap_p and not ex.no_recap:
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

    def __init__(self, n: int, pool, tok):
        import multiprocessing as mp
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's thread pool must not cross fork()
        self.procs = mp.get_context("fork").Pool(n, initializer=_worker_init, initargs=(pool, tok))

    def stage(self, seed: int, start: int, end: int, T: int, B: int, lm_rate: float, mix, task,
              recap_p: float = RECAP_P):
        return self.procs.imap(_worker_batch, [(seed, s, T, B, lm_rate, mix, task, recap_p)
                                               for s in range(start, end)])

    def close(self):
        self.procs.terminate()


_W: dict = {}


def _worker_init(pool, tok):
    torch.set_num_threads(1)
    _W.update(pool=pool, tok=tok)


def _worker_batch(job):
    seed, step, T, B, lm_rate, mix, task, recap_p = job
    rng = step_rng(seed, step)
    ids, lm_pos, ans, meta = make_batch(rng, _W["pool"], _W["tok"], T, B, lm_rate, mix=mix, task_opts=task,
                                        recap_p=recap_p)
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
def quick_eval(model, pool, tok, T: int, n: int, seed: int, dense: bool, device, mix=None, task=None) -> dict:
    """Held-out, teacher-forced: share of questions whose every answer token is the argmax, and indexer
    recall of the value's entries in the real top-k (sparse forward) at the first answer query."""
    model.eval()
    rng = random.Random(seed)
    exact, total, by_kind = 0, 0, {}
    for i in range(n):
        ids, lm_pos, ans, meta = make_batch(rng, pool, tok, T, 1, 0.0, variant="eval", recap=False, mix=mix,
                                            task_opts=task)
        with dense_csa(model, dense):
            logits = model(ids.to(device))[0]
        a_pos, a_tgt, _ = ans[0]
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


# --------------------------------------------------------------------------------------------- checkpoints
def save_ckpt(path: Path, model, opt, step: int, extra: dict):
    tmp = path.with_suffix(".tmp")
    torch.save({"model": export_state(model), "opt": opt.state_dict(), "step": step, "extra": extra}, tmp)
    os.replace(tmp, path)


def export(model, out_dir: Path, shard_mb: float = 0, config: dict = CONFIG):
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
    (out_dir / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
    shutil.copyfile(REPO / "assets" / "tokenizer.json", out_dir / "tokenizer.json")


def initial_model(recipe: Recipe, phase: Phase, seed: int, init_from: Path | None) -> Transformer:
    """A phase's starting weights: built from scratch (the phase's Init), or loaded from ``init_from`` (then
    ``free_rope_channels`` if the phase asks for it)."""
    torch.manual_seed(seed)
    model = build_model(seed, phase.init, recipe.config)
    if init_from is not None:
        from safetensors.torch import load_file
        state = {}
        for f in sorted(Path(init_from).glob("*.safetensors")):
            state.update(load_file(str(f)))
        model.load_state_dict(state, strict=True)
        if recipe.config["tie_word_embeddings"]:
            model.head.weight = model.embed.weight
        if phase.init.free_rope_channels:
            with torch.no_grad():
                free_rope_channels(model)
        print(f"initialised from {init_from}" + (" (RoPE channels freed)" if phase.init.free_rope_channels else ""),
              flush=True)
    return model


# --------------------------------------------------------------------------------------------- one phase
def run_phase(recipe: Recipe, phase: Phase, pdir: Path, init_from: Path | None, args, run: dict, device: str,
              seed: int, pool, heldout, tok, batches, export_dir: Path | None) -> bool:
    """Train one phase in ``pdir``, resuming its checkpoint if there is one. True when it ran to its end (the
    weights then exported to ``pdir/model``), False when --max-steps or --time-budget stopped it."""
    torch.set_num_threads(run["threads"])
    pdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = pdir / "checkpoint.pt"
    fresh = not ckpt_path.is_file()
    if fresh:  # what this phase starts from, for the record
        (pdir / "phase.json").write_text(json.dumps({"recipe": recipe.name, "phase": asdict(phase), "seed": seed,
                                                     "init_from": None if init_from is None else str(init_from),
                                                     "device": device, "run": run}, indent=1) + "\n")
    dev = torch.device(device)
    model = initial_model(recipe, phase, seed, init_from if fresh else None).to(dev)
    for blk in model.layers:
        if run["query_block"]:
            blk.attn.query_block = run["query_block"]
        if run["score_budget_mb"]:
            blk.attn.score_budget = run["score_budget_mb"] << 20
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-8)
    step = 0
    if not fresh:
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        model.load_state_dict(ck["model"], strict=True)
        if recipe.config["tie_word_embeddings"]:
            model.head.weight = model.embed.weight
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        print(f"resumed from {ckpt_path} at step {step}", flush=True)

    csa_layer = next(i for i, t in enumerate(model.config.layer_types) if t == CSA)
    probe = CSAProbe(model, csa_layer)
    hca_layer = next((i for i, t in enumerate(model.config.layer_types) if t == HCA), None)
    hca_probe = HCAProbe(model, hca_layer) if hca_layer is not None else None
    balancer = BiasBalancer(model)
    log = open(pdir / "log.jsonl", "a")
    model.train()
    stages = phase.stages
    last_ckpt = t_start = time.time()
    deadline = t_start + args.time_budget * 60 if args.time_budget else None
    begin = 0

    def save(name: str, export_stage: bool):
        save_ckpt(ckpt_path, model, opt, step, {"recipe": recipe.name, "phase": phase.name, "stage": name})
        if export_stage and export_dir is not None:
            export(model, export_dir / f"step{step}", run["shard_mb"], recipe.config)

    def stop(name: str, why: str) -> bool:
        save(name, True)
        print(f"stopped at step {step} of phase {phase.name} ({why}); rerun the same command to go on", flush=True)
        log.close()
        return False

    for si, stage in enumerate(stages):
        T, B, dense, lr_peak = stage.seq_len, stage.batch, stage.dense_csa, stage.lr
        end = begin + stage.steps
        sched_off, sched_len = stage.sched or (0, stage.steps)
        sargs = argparse.Namespace(**{**vars(args), **stage.settings})  # the stage's loss weights
        mix = stage.mix if stage.mix is not None else phase.mix
        task = stage.task if stage.task is not None else phase.task
        feed = None
        if batches is not None and run["workers"] and step < end:
            feed = batches.stage(seed, step, end, T, B, sargs.lm_rate, mix, task, phase.recap_p)
        stage_secs = []
        while step < end:
            if args.max_steps is not None and step >= args.max_steps:
                return stop(stage.name, "--max-steps")
            if deadline and time.time() > deadline:
                return stop(stage.name, "--time-budget")
            ts = time.time()
            lr = lr_at(step - begin + sched_off, sched_len, lr_peak)
            for gparam in opt.param_groups:
                gparam["lr"] = lr
            if feed is not None:
                ids, lm_pos, ans, meta, kl_seed = next(feed)
            else:
                rng = step_rng(seed, step)
                ids, lm_pos, ans, meta = make_batch(rng, pool, tok, T, B, sargs.lm_rate, mix=mix, task_opts=task,
                                                    recap_p=phase.recap_p)
                kl_seed = rng.randrange(1 << 30)
            with dense_csa(model, dense):
                loss, st = forward_losses(model, probe, ids, lm_pos, ans, sargs, kl_seed, dev, hca_probe, meta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            opt.step()
            balancer.update()
            step += 1
            dt = time.time() - ts
            stage_secs.append(dt)
            if (deadline and si == len(stages) - 1 and step - begin == 20 and stage.sched is None
                    and sched_len == stage.steps):
                # the last stage's length fitted to the budget while still in warm-up (which does not
                # depend on the stage length): its cosine then runs to the end
                per = sorted(stage_secs[5:])[len(stage_secs[5:]) // 2] * 1.08  # median, +8% for evals
                fit = 20 + int((deadline - time.time()) / per)
                if fit < stage.steps:
                    end, sched_len = begin + max(fit, 31), max(fit, 31)
                    print(f"--time-budget: stage {stage.name} shortened to {sched_len} steps", flush=True)
                    log.write(json.dumps({"stage": stage.name, "fitted_steps": sched_len, "step": step}) + "\n")
            rec = {"step": step, "stage": stage.name, "T": T, "B": B, "lr": lr, "gnorm": gn, "sec": dt,
                   "tok_s": B * T / dt, "kinds": [m["kind"] for m in meta], **{k: round(v, 4) for k, v in st.items()}}
            log.write(json.dumps(rec) + "\n"); log.flush()
            if step % 5 == 0 or step == 1:
                print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                               if k not in ("kinds",)), flush=True)
            if run["eval_every"] and (step % run["eval_every"] == 0 or step == end):
                ev = quick_eval(model, heldout, tok, T, run["eval_n"], 99, dense, dev, phase.mix, phase.task)
                ev.update(step=step, stage=stage.name, eval=True)
                log.write(json.dumps(ev) + "\n"); log.flush()
                print("EVAL", json.dumps(ev), flush=True)
            if time.time() - last_ckpt > run["ckpt_minutes"] * 60 or step == end:
                save(stage.name, False)
                if step == end:  # each stage's end stays on disk (to export or resume from)
                    shutil.copyfile(ckpt_path, pdir / f"ckpt-step{step}.pt")
                    if export_dir is not None:
                        export(model, export_dir / f"step{step}", run["shard_mb"], recipe.config)
                last_ckpt = time.time()
        begin = end
    save("done", False)
    tmp = pdir / "model.tmp"  # the phase's end, for the next phase: written whole, then renamed
    shutil.rmtree(tmp, ignore_errors=True)
    export(model, tmp, 0, recipe.config)
    os.replace(tmp, pdir / "model")
    log.close()
    print(f"phase {phase.name} done: {step}/{phase.steps} steps ({(time.time() - t_start) / 60:.1f} min), "
          f"model in {pdir / 'model'}", flush=True)
    return True


# --------------------------------------------------------------------------------------------- recipes
def resolve_recipe(args) -> Recipe:
    """--recipe (or --smoke), with --experiment's JSON turning it into a one-phase "experiment" recipe:
    {"stages": [[name, steps, T, B, dense, lr, {options}], ...], "mix": [...], "task": {...}, "recap_p": p,
    "init": {...}, "config": {...}} (absent keys: the recipe's first phase's stages and init, the default mix
    and recap share, no task options, the recipe's config)."""
    recipe = RECIPES["smoke" if args.smoke else args.recipe]
    if not args.experiment:
        return recipe
    exp = json.loads(args.experiment)
    base = recipe.phases[0]
    phase = Phase("experiment", tuple(Stage.from_list(s) for s in exp["stages"]) if "stages" in exp else base.stages,
                  mix=tuple((k, float(w)) for k, w in exp["mix"]) if "mix" in exp else DEFAULT_MIX,
                  task=exp.get("task", {}), recap_p=exp.get("recap_p", RECAP_P),
                  init=Init.from_dict(exp["init"]) if "init" in exp else base.init)
    return Recipe("experiment", (phase,), {**recipe.config, **exp.get("config", {})}).validated()


def run_settings(phase: Phase, args, device: str) -> dict:
    """RUN_DEFAULTS, then the phase's ``run`` (``run_cpu`` for a gpu phase on a CPU), then the command line."""
    run = dict(RUN_DEFAULTS, **phase.run)
    if device == "cpu" and phase.gpu:
        run.update(phase.run_cpu)
    run.update({k: getattr(args, k) for k in RUN_DEFAULTS if getattr(args, k) is not None})
    return run


def phase_device(phase: Phase, args) -> str | None:
    """--device, else CUDA when available; None for a gpu phase without CUDA (unless --gpu-phases-on-cpu)."""
    if args.device:
        return args.device
    if torch.cuda.is_available():
        return "cuda"
    return None if phase.gpu and not args.gpu_phases_on_cpu else "cpu"


def list_recipes() -> str:
    lines = []
    for r in RECIPES.values():
        lines.append(f"{r.name}: {r.about}")
        for p in r.phases:
            start = "from the previous phase" if p.start == "previous" else "from scratch"
            lines.append(f"  {p.name:6s} {p.steps:5d} steps, seed {p.seed}, {start}{', GPU' if p.gpu else ''}: "
                         + ", ".join(f"{s.name} ({s.steps} x {s.seq_len})" for s in p.stages))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "train" / "runs" / "ds4-tiny"))
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="shipped",
                    help="train/recipes.py: 'shipped' (every phase of the shipped model), 'cpu' (everything in "
                         "one CPU run), 'smoke', or a tried phase (end-2, end-3, end-5; with --init-from)")
    ap.add_argument("--list", action="store_true", help="print the recipes, their phases and stages, and exit")
    ap.add_argument("--phases", default=None, help="comma-separated phases of the recipe to run (default: all)")
    ap.add_argument("--gpu-phases-on-cpu", action="store_true",
                    help="without CUDA, run the recipe's GPU phases on the CPU (hours) instead of stopping")
    ap.add_argument("--seed", type=int, default=None, help="data seed of every phase (default: each phase's own)")
    ap.add_argument("--smoke", action="store_true", help="the same as --recipe smoke")
    ap.add_argument("--pool-bytes", type=int, default=16_000_000, help="train-split text for haystacks")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the phase's, else 1: several times faster than 2 on the shared "
                         "2-core machine)")
    ap.add_argument("--device", default=None, help="every phase on this device (default: CUDA when available)")
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
    ap.add_argument("--ckpt-minutes", type=float, default=None,
                    help="checkpoint interval (default: the phase's, else 10)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="held-out check interval (default: the phase's, else 100)")
    ap.add_argument("--eval-n", type=int, default=None,
                    help="examples per held-out check (default: the phase's, else 16)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop the phase under way at this step of it (rerun the command to go on)")
    ap.add_argument("--export", default=None,
                    help="write config/safetensors/tokenizer of the latest checkpoint in OUT here and exit")
    ap.add_argument("--export-stages", default=None,
                    help="also export each stage's end (and a stop) to DIR/step<N>/ (DIR/<phase>/step<N>/ for a "
                         "recipe of several phases)")
    ap.add_argument("--shard-mb", type=float, default=None,
                    help="with --export(-stages): safetensors files of at most this size (default: the phase's)")
    ap.add_argument("--init-from", default=None,
                    help="start the first phase run from this model folder's weights (fresh optimiser)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="minutes of training per phase: its last stage is shortened, once its warm-up is timed, so "
                         "that the phase ends within the budget with its whole cosine; any stage stops at the budget")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes that build batches ahead of the steps (default: the phase's, else 0)")
    ap.add_argument("--query-block", type=int, default=None,
                    help="queries per attention block (runtime default 128; larger = fewer kernels on a GPU)")
    ap.add_argument("--score-budget-mb", type=int, default=None,
                    help="fp32 scratch per attention block (runtime default 256 MB; caps the query block)")
    ap.add_argument("--experiment", default=None, help="JSON for a one-phase experiment (resolve_recipe): "
                    '{"mix": [["niah", 1.0]], "task": {"max_needles": 1}, "stages": [[name, steps, T, B, dense, lr, {}]]}')
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print(list_recipes())
        return 0
    recipe = resolve_recipe(args)
    names = [p.name for p in recipe.phases]
    chosen = args.phases.split(",") if args.phases else names
    if set(chosen) - set(names):
        sys.exit(f"error: recipe {recipe.name} has no phase {sorted(set(chosen) - set(names))}; it has {names}")
    phases = [p for p in recipe.phases if p.name in chosen]
    out = Path(args.out)
    pdir = {p.name: out / p.name if len(recipe.phases) > 1 else out for p in recipe.phases}
    seed_of = {p.name: p.seed if args.seed is None else args.seed for p in recipe.phases}

    def start_of(phase: Phase, planned=()) -> Path | None:
        """The weights a phase starts from (exits if they are missing and not among the ``planned`` phases)."""
        if phase is phases[0] and args.init_from:
            return Path(args.init_from)
        if phase.start == "scratch":
            return None
        i = names.index(phase.name)
        prev = pdir[names[i - 1]] / "model" if i else None
        if prev is None or not (prev.is_dir() or names[i - 1] in planned):
            after = f"phase {names[i - 1]}'s end ({prev}), which is not there" if i else "a model folder"
            sys.exit(f"error: phase {phase.name} starts from {after}: pass --init-from DIR"
                     + (" or run that phase first" if i else ""))
        return prev

    if args.export:
        done = [p for p in phases if (pdir[p.name] / "checkpoint.pt").is_file()]
        p = done[-1] if done else phases[0]
        ck = pdir[p.name] / "checkpoint.pt"
        model = initial_model(recipe, p, seed_of[p.name], None if done else start_of(p))
        if done:
            model.load_state_dict(torch.load(ck, map_location="cpu", weights_only=False)["model"], strict=True)
        export(model, Path(args.export), args.shard_mb or 0, recipe.config)
        print(f"exported {ck if done else 'the initial weights of phase ' + p.name} to {args.export}")
        return 0

    todo = [p for p in phases if not (pdir[p.name] / "model").is_dir()]
    for p in phases:
        if p not in todo:
            print(f"phase {p.name}: done ({pdir[p.name] / 'model'})", flush=True)
    devices = {p.name: phase_device(p, args) for p in todo}
    runnable = []
    for p in todo:
        if devices[p.name] is None:
            break
        runnable.append(p)
    for i, p in enumerate(runnable):  # every start is there, or made by a phase before it, before any work
        if not (pdir[p.name] / "checkpoint.pt").is_file():
            start_of(p, {q.name for q in runnable[:i]})
    batches = pool = heldout = None
    tok = Tokenizer.default()
    if runnable:
        t0 = time.time()
        pool = tasks.TokenPool.corpus("train", args.pool_bytes, tok, cache_dir=REPO / "train" / "runs")
        heldout = tasks.TokenPool.corpus("heldout", 3_000_000, tok, cache_dir=REPO / "train" / "runs", strict=False)
        print(f"pools: train {len(pool)} tokens, heldout {len(heldout)} tokens ({time.time() - t0:.0f}s)", flush=True)
        n_workers = max(run_settings(p, args, devices[p.name])["workers"] for p in runnable)
        # batch workers fork before any CUDA work (a forked child must not inherit a live CUDA context)
        batches = BatchWorkers(n_workers, pool, tok) if n_workers else None
    try:
        for p in runnable:
            print(f"phase {p.name} of recipe {recipe.name} on {devices[p.name]}: {p.about}", flush=True)
            export_dir = None
            if args.export_stages:
                export_dir = Path(args.export_stages) / (p.name if len(recipe.phases) > 1 else "")
            run = run_settings(p, args, devices[p.name])
            ckpt = pdir[p.name] / "checkpoint.pt"
            if not run_phase(recipe, p, pdir[p.name], None if ckpt.is_file() else start_of(p), args, run,
                             devices[p.name], seed_of[p.name], pool, heldout, tok, batches, export_dir):
                return 0
    finally:
        if batches is not None:
            batches.close()
    if len(runnable) < len(todo):
        p = todo[len(runnable)]
        print(f"stopped before phase {p.name}: it needs a CUDA GPU ({', '.join(f'{s.seq_len:,}' for s in p.stages)}"
              f"-token sequences) and none is available. Rerun this command on a CUDA machine with {out} copied "
              f"over, or add --gpu-phases-on-cpu to run the GPU phases on this CPU (hours per phase; see "
              f"train/train.py), or train with --recipe cpu (one CPU run, ~130 min).", file=sys.stderr, flush=True)
        return 3
    last = pdir[phases[-1].name] / "model"
    print(f"recipe {recipe.name} done: the model is {last}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
