"""Training recipes as data: the stages, phases and settings that train a model (train/train.py runs them).

A *stage* is a stretch of steps at one sequence length with a warm-up + cosine learning rate of its own (or a
slice of a longer one, ``sched``). A *phase* is one training run over its stages: a fresh optimiser, its own
data seed, starting from scratch or from the weights the previous phase ended with. A *recipe* is a chain of
phases plus the model config. train.py runs a recipe's phases in order, each in its own folder, and chains
each phase's exported weights into the next itself.

    shipped     every phase of the shipped model (assets/model/MODEL_CARD.md, training history), in order:
                cpu (STAGES, 4,650 steps) -> gpu-1 (16k and 32k tokens) -> gpu-2 (64k) -> end-1 (4k and 8k, the
                asked needle last) -> end-4 (RoPE channels freed, position skips); end-4's export is the model
    cpu         the whole run on a 2-core CPU in about 130 minutes (CPU_STAGES: what the GPU phases and the
                CPU finish taught, folded into one run)
    smoke       a few minutes: does it learn at all?
    end-2, end-3, end-5
                CPU-finish phases that were tried and not shipped, each from a model folder (--init-from)

The GPU phases (``Phase.gpu``) ran on one H200 with the ``run`` settings; ``run_cpu`` holds the settings they
ran with on a CPU (the former cpu_long.sh: hours per phase). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from runtime.config import CSA, HCA, SLIDING
from runtime.tasks import KINDS

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

DEFAULT_MIX = (("niah", 0.7), ("kv", 0.2), ("continue", 0.1))  # example kinds and their shares
DEFAULT_TASK = {"value_fmt": "number", "max_needles": 4}  # niah: numeric values (RULER-style passkeys)
RECAP_P = 0.6  # share of training examples with a copy drill (tasks.add_recap)
# command-line settings a stage may set for itself (loss weights and data options of train.py)
STAGE_SETTINGS = frozenset({"lm_rate", "w_answer", "w_csa", "w_idx", "w_kl", "w_read", "w_slot", "w_hca",
                            "hca_as_if", "skip_p", "skip_max", "kl_queries"})
TASK_OPTIONS = frozenset({"n_questions", "max_needles", "value_fmt", "edge_p", "last_p", "run_p"})  # make_example
# how a phase runs (speed and bookkeeping, not what it learns); the command line overrides them
RUN_DEFAULTS = {"threads": 1, "workers": 0, "query_block": None, "score_budget_mb": None, "eval_every": 100,
                "eval_n": 16, "ckpt_minutes": 10.0, "shard_mb": 0}


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    seq_len: int
    batch: int
    dense_csa: bool  # CSA attends to every compressed entry, the indexer detached (V3.2's dense warm-up)
    lr: float  # peak learning rate
    mix: tuple[tuple[str, float], ...] | None = None  # example kinds and shares; None: the phase's
    task: Mapping | None = None  # tasks.make_example options; None: the phase's
    sched: tuple[int, int] | None = None  # (offset, length) of this stage inside a longer warm-up + cosine
    settings: Mapping[str, float] = field(default_factory=dict)  # STAGE_SETTINGS for this stage

    @classmethod
    def from_list(cls, item) -> "Stage":
        """From the 7-item form ``[name, steps, T, B, dense, lr, {options}]`` of ``--experiment``'s JSON:
        options "mix", "task", "sched"; any other key is a stage setting."""
        name, steps, seq_len, batch, dense, lr, opts = item
        opts = dict(opts)
        mix, task, sched = opts.pop("mix", None), opts.pop("task", None), opts.pop("sched", None)
        return cls(name, int(steps), int(seq_len), int(batch), bool(dense), float(lr),
                   None if mix is None else tuple((k, float(w)) for k, w in mix), task,
                   None if sched is None else tuple(sched), opts)


@dataclass(frozen=True)
class Init:
    """How a phase's weights start. From scratch: the slot layout (train.py slot_layout, strength
    ``ape_slots``; 0 = none) with or without the RoPE channels kept free. From earlier weights:
    ``free_rope_channels`` first (train.py free_rope_channels)."""
    ape_slots: float = 5.0
    rope_free: bool = False
    free_rope_channels: bool = False

    @classmethod
    def from_dict(cls, d: Mapping) -> "Init":  # --experiment's "init": absent keys are off
        return cls(float(d.get("ape_slots", 0.0)), bool(d.get("rope_free", False)),
                   bool(d.get("free_rope_channels", False)))


@dataclass(frozen=True)
class Phase:
    name: str
    stages: tuple[Stage, ...]
    seed: int = 1234  # data seed: every draw of step s comes from (seed, s)
    start: str = "scratch"  # or "previous": the weights the previous phase ended with (fresh optimiser)
    init: Init = Init()
    mix: tuple[tuple[str, float], ...] = DEFAULT_MIX  # for stages without their own, and the held-out checks
    task: Mapping = field(default_factory=lambda: dict(DEFAULT_TASK))
    recap_p: float = RECAP_P
    gpu: bool = False  # sequences a CPU cannot afford: runs on CUDA (see train.py for a machine without)
    run: Mapping = field(default_factory=dict)  # RUN_DEFAULTS keys
    run_cpu: Mapping | None = None  # a gpu phase's run settings when it runs on a CPU
    about: str = ""

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.stages)


@dataclass(frozen=True)
class Recipe:
    name: str
    phases: tuple[Phase, ...]
    config: Mapping = field(default_factory=lambda: dict(CONFIG))  # the model's config.json
    about: str = ""

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"recipe {self.name!r} has no phase {name!r}; it has {[p.name for p in self.phases]}")

    def problems(self) -> list[str]:
        """What is wrong with this recipe (empty if nothing)."""
        out = []
        if not self.phases:
            out.append("no phases")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            out.append(f"phase names repeat: {names}")
        for p in self.phases:
            where = f"{self.name}/{p.name}"
            if p.start not in ("scratch", "previous"):
                out.append(f"{where}: start must be 'scratch' or 'previous', not {p.start!r}")
            if not p.stages:
                out.append(f"{where}: no stages")
            if p.gpu and p.run_cpu is None:
                out.append(f"{where}: a gpu phase needs run_cpu (its settings on a CPU)")
            for run in (p.run, p.run_cpu or {}):
                if set(run) - set(RUN_DEFAULTS):
                    out.append(f"{where}: unknown run settings {sorted(set(run) - set(RUN_DEFAULTS))}")
            out += _mix_problems(where, p.mix) + _task_problems(where, p.task)
            if not 0 <= p.recap_p <= 1:
                out.append(f"{where}: recap_p {p.recap_p} outside [0, 1]")
            snames = [s.name for s in p.stages]
            if len(set(snames)) != len(snames):
                out.append(f"{where}: stage names repeat: {snames}")
            for s in p.stages:
                w = f"{where}/{s.name}"
                if s.steps < 1 or s.seq_len < 64 or s.batch < 1 or not s.lr > 0:
                    out.append(f"{w}: steps, seq_len (>= 64), batch and lr must be positive")
                if s.sched is not None and not (0 <= s.sched[0] and s.sched[0] + s.steps <= s.sched[1]):
                    out.append(f"{w}: sched {s.sched} does not hold the stage's {s.steps} steps")
                if set(s.settings) - STAGE_SETTINGS:
                    out.append(f"{w}: unknown stage settings {sorted(set(s.settings) - STAGE_SETTINGS)}")
                if s.mix is not None:
                    out += _mix_problems(w, s.mix)
                if s.task is not None:
                    out += _task_problems(w, s.task)
        return out

    def validated(self) -> "Recipe":
        bad = self.problems()
        if bad:
            raise ValueError(f"recipe {self.name!r}: " + "; ".join(bad))
        return self


def _mix_problems(where: str, mix) -> list[str]:
    kinds = [k for k, _ in mix]
    if not kinds or set(kinds) - set(KINDS) or abs(sum(w for _, w in mix) - 1.0) > 1e-6:
        return [f"{where}: mix {mix} must name kinds of {KINDS} with shares summing to 1"]
    return []


def _task_problems(where: str, task) -> list[str]:
    return [f"{where}: unknown task options {sorted(set(task) - TASK_OPTIONS)}"] if set(task) - TASK_OPTIONS else []


# --------------------------------------------------------------------------------------------- the shipped model
# Phase "cpu" (STAGES): the first stage runs the CSA layer dense over all compressed entries at short length;
# later stages use the real sparse top-k at longer lengths. The copy circuit forms fastest on needles alone
# (numeric values of 4-8 digits), then all three skills, then needles again (up to 6 per example, as many as
# the evaluation plants) while the rate anneals.
_LONG_MIX = (("niah", 0.8), ("kv", 0.2))
_TASK6 = {"value_fmt": "number", "max_needles": 6}
_EDGE = {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2}
_HCA = {"w_hca": 2.0}
STAGES = (
    Stage("niah-320", 1000, 320, 4, True, 2e-3, (("niah", 1.0),), {"value_fmt": "number:4-8", "max_needles": 4}),
    Stage("mix-384", 600, 384, 4, True, 1.5e-3, sched=(0, 2600)),
    Stage("niah-384", 800, 384, 4, True, 1e-3, (("niah", 0.85), ("kv", 0.15)), _TASK6, sched=(0, 1200)),
    # long sequences last: the HCA layer must meet many entries (32 at 4,096 tokens, not 3 at 384) and the
    # CSA layer the real top-k, or accuracy falls with length; the HCA penalty (HCAProbe) keeps the share
    # of attention its entries take from growing with their number
    Stage("sparse-1024", 200, 1024, 2, False, 5e-4, (("niah", 0.7), ("kv", 0.2), ("continue", 0.1)), settings=_HCA),
    Stage("sparse-4096", 150, 4096, 1, False, 4e-4, _LONG_MIX, _TASK6, settings=_HCA),
    # more of the long, sparse regime (copy precision fell with length: single-digit slips at 32k), with a
    # fifth of the needles on the haystack's first or last line (the last one sits in the sliding window)
    Stage("long-4096", 700, 4096, 1, False, 3e-4, _LONG_MIX, _EDGE, settings=_HCA),
    Stage("long-8192", 300, 8192, 1, False, 2e-4, _LONG_MIX, _EDGE, settings=_HCA),
    # the same regime again: each earlier long stage lifted 32k/128k accuracy while answer-token accuracy
    # stayed ~0.85, so more steps at the longest affordable length
    Stage("long-8192b", 700, 8192, 1, False, 2e-4, _LONG_MIX, _EDGE, settings=_HCA),
    # then 200 steps of it at a low peak rate (a restart at 1.5e-4 lost 32k accuracy; see the model card)
    Stage("long-8192c", 200, 8192, 1, False, 3e-5, _LONG_MIX, _EDGE, settings=_HCA),
)
# GPU phases: sequences a CPU cannot afford, each phase one 10-minute command on one H200 (the last stage of
# each was fitted to the time left with --time-budget; these are the fitted lengths). Kernel launches bound a
# step there, so fewer, larger attention blocks and batches built ahead in processes.
_GPU_RUN = {"workers": 8, "query_block": 2048, "score_budget_mb": 4096, "eval_every": 250, "eval_n": 8,
            "ckpt_minutes": 100, "shard_mb": 15}
_GPU_ON_CPU = {"threads": 2, "workers": 0, "score_budget_mb": None, "ckpt_minutes": 10.0, "shard_mb": 0}
_GPU = dict(start="previous", mix=_LONG_MIX, task=_EDGE, gpu=True, run=_GPU_RUN, run_cpu=_GPU_ON_CPU)
# CPU finish: two torch threads. Until here a needle on the haystack's last line, right before the question,
# was answered with stray digits or newlines at 32k-128k: the recap drill (60% of examples) puts lines holding
# *unasked* values right before the question, so the model learned that a value there is not the answer.
# ``last_p`` puts the asked needle there, without a recap, in 30% of needle examples (end-1). Far copies then
# slipped because the slot layout had put half of slot 3's channels where RoPE turns them by the query-entry
# distance: end-4 frees those channels (free_rope_channels) and trains with position skips (skip_p, PoSE).
_LAST = dict(_EDGE, last_p=0.3)
_SKIPS = {"w_hca": 2.0, "skip_p": 0.5, "skip_max": 262144}
_END_RUN = {"threads": 2, "eval_every": 1000, "eval_n": 8}
_END = dict(start="previous", init=Init(ape_slots=0.0), mix=_LONG_MIX, task=_LAST, run=_END_RUN)

PHASES = {p.name: p for p in (
    Phase("cpu", STAGES, about="the CPU schedule, steps 1-4,650 of the model card (one torch thread)"),
    Phase("gpu-1", (Stage("gpu-16k", 200, 16384, 2, False, 1e-4, _LONG_MIX, _EDGE, settings=_HCA),
                    Stage("gpu-32k", 567, 32768, 1, False, 5e-5, _LONG_MIX, _EDGE, settings=_HCA)),
          seed=4651, about="16,384 x 2 then 32,768 tokens: 25.1M tokens, 6.6 min on one H200", **_GPU),
    Phase("gpu-2", (Stage("gpu-64k", 196, 65536, 1, False, 3e-5, _LONG_MIX, _EDGE, settings=_HCA),),
          seed=4652, about="65,536 tokens: 12.9M tokens, 2.6 min on one H200", **_GPU),
    Phase("end-1", (Stage("end-4096", 150, 4096, 1, False, 5e-5, _LONG_MIX, _LAST, settings=_HCA),
                    Stage("end-8192", 200, 8192, 1, False, 5e-5, _LONG_MIX, _LAST, settings=_HCA)),
          seed=5614, about="CPU finish: the asked needle right before the question in 30% of needle examples", **_END),
    Phase("end-2", (Stage("end-16k", 150, 16384, 1, False, 3e-5, _LONG_MIX, dict(_LAST, run_p=0.33), settings=_HCA),),
          seed=5615, about="tried after end-1, not shipped: 16k tokens, a third of the numbers with a digit run",
          **_END),
    Phase("end-3", (Stage("skip-4096", 500, 4096, 1, False, 1e-4, _LONG_MIX, _LAST,
                          settings=dict(_SKIPS, skip_p=0.8)),),
          seed=5617, about="tried after end-1, not shipped: position skips alone", **_END),
    Phase("end-4", (Stage("rope-free-4096", 600, 4096, 1, False, 1e-4, _LONG_MIX, _LAST, settings=_SKIPS),),
          seed=5618, about="after end-1: RoPE channels freed, position skips in half the steps (shipped)",
          **dict(_END, init=Init(ape_slots=0.0, free_rope_channels=True))),
    Phase("end-5", (Stage("more-4096", 600, 4096, 1, False, 5e-5, _LONG_MIX, _LAST, settings=_SKIPS),),
          seed=5619, about="after end-4: its regime again at half the rate (the CPU-only rerun)", **_END),
)}

# The CPU recipe: the whole run on a 2-core CPU in about 130 minutes, no GPU phases, no separate finish. The
# first five stages are STAGES' own; what the shipped model learnt in its GPU phases and CPU finish is folded
# into the long stages from the start: the slot layout keeps RoPE's channels free (rope_free, instead of
# free_rope_channels later), half the steps skip 4k-256k RoPE positions between the asked value and the
# question (PoSE: far distances at 4,096-8,192 tokens' cost), and 30% of needle examples put the asked needle
# right before the question (last_p, instead of phase end-1).
_CPU_LONG = dict(mix=_LONG_MIX, task=_LAST, settings=_SKIPS)
CPU_STAGES = STAGES[:5] + (
    Stage("long-4096", 700, 4096, 1, False, 3e-4, **_CPU_LONG),
    Stage("long-8192", 300, 8192, 1, False, 2e-4, **_CPU_LONG),
    Stage("anneal-4096", 600, 4096, 1, False, 1e-4, **_CPU_LONG),
)
SMOKE_STAGES = (Stage("smoke-dense-384", 120, 384, 4, True, 2e-3), Stage("smoke-sparse-512", 20, 512, 2, False, 1e-3))

RECIPES = {r.name: r.validated() for r in (
    Recipe("shipped", tuple(PHASES[n] for n in ("cpu", "gpu-1", "gpu-2", "end-1", "end-4")),
           about="every phase of the shipped model: 6,563 steps (4,650 on a CPU, 963 on a GPU, 950 on a CPU)"),
    Recipe("cpu", (Phase("cpu", CPU_STAGES, init=Init(rope_free=True),
                         about="4,350 steps, 128.5 min of step time on two CPU cores"),),
           about="everything in one CPU run"),
    Recipe("smoke", (Phase("smoke", SMOKE_STAGES),), about="does it learn at all? (a few minutes)"),
    *(Recipe(n, (PHASES[n],), about=PHASES[n].about + " (--init-from a model folder)")
      for n in ("end-2", "end-3", "end-5")),
)}
