"""Training recipes (train/recipes.py) and the runner that chains their phases (train/train.py): the registry
is valid, --recipe cpu is the schedule it was before recipes were data, --recipe shipped is the model card's
phases in order (the former shell scripts' stages and flags), and a toy recipe of two phases chains, stops
and resumes."""

import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def T():
    """train/train.py by path, loaded when a test runs: it puts train/ on sys.path, and collected at import
    that would make `from train import ...` elsewhere resolve to train/train.py."""
    name = "longlens_train_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "train" / "train.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def R(T):
    import recipes  # train/recipes.py (train.py put train/ on the path)

    return recipes


def legacy(stage) -> tuple:
    """A Stage in the 7-tuple form STAGES had before: (name, steps, T, B, dense, lr, options)."""
    opts = {}
    if stage.mix is not None:
        opts["mix"] = [list(m) for m in stage.mix]
    if stage.sched is not None:
        opts["sched"] = tuple(stage.sched)
    if stage.task is not None:
        opts["task"] = dict(stage.task)
    opts.update(stage.settings)
    return (stage.name, stage.steps, stage.seq_len, stage.batch, stage.dense_csa, stage.lr, opts)


# Printed by the code before recipes were data (train.py CPU_STAGES, RECIPES["cpu"], MIX, TASK_OPTS, RECAP_P).
_NIAH6 = {"value_fmt": "number", "max_needles": 6}
_LONG = {"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0, "skip_p": 0.5, "skip_max": 262144,
         "task": {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2, "last_p": 0.3}}
OLD_CPU_STAGES = [
    ("niah-320", 1000, 320, 4, True, 0.002, {"mix": [["niah", 1.0]], "task": {"value_fmt": "number:4-8", "max_needles": 4}}),
    ("mix-384", 600, 384, 4, True, 0.0015, {"sched": (0, 2600)}),
    ("niah-384", 800, 384, 4, True, 0.001, {"mix": [["niah", 0.85], ["kv", 0.15]], "sched": (0, 1200), "task": _NIAH6}),
    ("sparse-1024", 200, 1024, 2, False, 0.0005, {"mix": [["niah", 0.7], ["kv", 0.2], ["continue", 0.1]], "w_hca": 2.0}),
    ("sparse-4096", 150, 4096, 1, False, 0.0004, {"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0, "task": _NIAH6}),
    ("long-4096", 700, 4096, 1, False, 0.0003, _LONG),
    ("long-8192", 300, 8192, 1, False, 0.0002, _LONG),
    ("anneal-4096", 600, 4096, 1, False, 0.0001, _LONG),
]
_EDGE = {"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0,
         "task": {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2}}
OLD_STAGES = OLD_CPU_STAGES[:5] + [("long-4096", 700, 4096, 1, False, 0.0003, _EDGE),
                                   ("long-8192", 300, 8192, 1, False, 0.0002, _EDGE),
                                   ("long-8192b", 700, 8192, 1, False, 0.0002, _EDGE),
                                   ("long-8192c", 200, 8192, 1, False, 3e-05, _EDGE)]
# sha256[:16] of (ids, lm_pos, ans, meta, KL seed) of the first two steps of each cpu stage (length capped at
# 1,024) on the lighthouse example, and of three held-out-check batches, from the code before recipes
OLD_BATCHES = {
    "niah-320@0": "4fa52e069731e800", "niah-320@1": "9689d23aac79303c", "mix-384@1000": "857059f8ba04a130",
    "mix-384@1001": "cb1599844c8fca8f", "niah-384@1600": "6203a7da5f5142eb", "niah-384@1601": "b6d0c77e2186d705",
    "sparse-1024@2400": "512480ea0983663c", "sparse-1024@2401": "15053b3406ed3e96",
    "sparse-4096@2600": "3d5dc415773fbac9", "sparse-4096@2601": "ed8d54ec577a7196",
    "long-4096@2750": "109634b3ead33023", "long-4096@2751": "5e4f42161a187354",
    "long-8192@3450": "66ce1324927fc7ed", "long-8192@3451": "65fb903c9603274b",
    "anneal-4096@3750": "b3a9217f6645d781", "anneal-4096@3751": "c8369697b5da9fc8",
}
OLD_EVAL = {320: "f2185d92c7da4665", 1024: "71033f00cf89066c"}


@pytest.fixture(scope="module")
def tok(T):
    return T.Tokenizer.default()


@pytest.fixture(scope="module")
def pool(T, tok):
    text = (REPO / "assets" / "examples" / "lighthouse_log.md").read_text()
    return T.tasks.TokenPool.from_texts([text] * 8, tok)


def test_every_recipe_is_valid(R):
    assert {"shipped", "cpu", "smoke"} <= set(R.RECIPES)
    for name, recipe in R.RECIPES.items():
        assert recipe.name == name and recipe.problems() == [], name
    bad = R.Recipe("bad", (R.Phase("p", (R.Stage("s", 10, 256, 1, False, 1e-3, mix=(("niah", 0.5),),
                                                 task={"needles": 3}, sched=(5, 10), settings={"w_typo": 1.0}),
                                         R.Stage("s", 0, 256, 1, False, 1e-3)), gpu=True),))
    got = " ".join(bad.problems())
    for what in ("mix", "needles", "sched", "w_typo", "stage names repeat", "positive", "run_cpu"):
        assert what in got, what
    with pytest.raises(ValueError, match="recipe 'bad'"):
        bad.validated()


def test_cpu_recipe_is_the_schedule_it_was(T, R, tok, pool):
    """--recipe cpu: the same stages, steps, lengths, rates and options as the 7-tuples it replaced, the same
    defaults, and so the same batches at every stage's start."""
    (phase,) = R.RECIPES["cpu"].phases
    assert [legacy(s) for s in phase.stages] == OLD_CPU_STAGES
    assert phase.seed == 1234 and phase.start == "scratch" and not phase.gpu
    assert phase.init == R.Init(ape_slots=5.0, rope_free=True, free_rope_channels=False)
    assert phase.mix == (("niah", 0.7), ("kv", 0.2), ("continue", 0.1))
    assert phase.task == {"value_fmt": "number", "max_needles": 4} and phase.recap_p == 0.6
    assert dict(R.RECIPES["cpu"].config) == T.CONFIG
    assert hashlib.sha256(json.dumps(T.CONFIG, sort_keys=True).encode()).hexdigest() == \
        "ac15de70d283a0cca2826e3cdfb3cc9e6c60d06c0e48a1a7f4631429a137d884"
    got, begin = {}, 0
    for st in phase.stages:
        mix = st.mix if st.mix is not None else phase.mix
        task = st.task if st.task is not None else phase.task
        for s in (begin, begin + 1):
            rng = T.step_rng(phase.seed, s)
            ids, lm_pos, ans, meta = T.make_batch(rng, pool, tok, min(st.seq_len, 1024), st.batch, 0.02, mix=mix,
                                                  task_opts=task, recap_p=phase.recap_p)
            blob = json.dumps([ids.tolist(), lm_pos, ans, meta, rng.randrange(1 << 30)])
            got[f"{st.name}@{s}"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        begin += st.steps
    assert got == OLD_BATCHES
    for L, want in OLD_EVAL.items():
        rng, r = random.Random(99), []
        for _ in range(3):
            ids, _, ans, meta = T.make_batch(rng, pool, tok, L, 1, 0.0, variant="eval", recap=False, mix=phase.mix,
                                             task_opts=phase.task)
            r.append([ids.tolist(), ans, meta])
        assert hashlib.sha256(json.dumps(r).encode()).hexdigest()[:16] == want


# The stages of the shell scripts the shipped recipe replaces (train/gpu_long.sh, train/cpu_end.sh phases 1
# and 4), as their JSON had them, with the flags they passed.
_O = '"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0, "task": {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2}'
_TASK = '"value_fmt": "number", "max_needles": 6, "edge_p": 0.2, "last_p": 0.3'
_O1 = '"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0, "task": {' + _TASK + '}'
_O4 = '"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0, "skip_p": 0.5, "skip_max": 262144, "task": {' + _TASK + '}'
SCRIPTS = {
    "gpu-1": (4651, '[["gpu-16k", 200, 16384, 2, false, 1e-4, {' + _O + '}], '
                    '["gpu-32k", 567, 32768, 1, false, 5e-5, {' + _O + '}]]'),
    "gpu-2": (4652, '[["gpu-64k", 196, 65536, 1, false, 3e-5, {' + _O + '}]]'),
    "end-1": (5614, '[["end-4096", 150, 4096, 1, false, 5e-5, {' + _O1 + '}], '
                    '["end-8192", 200, 8192, 1, false, 5e-5, {' + _O1 + '}]]'),
    "end-4": (5618, '[["rope-free-4096", 600, 4096, 1, false, 1e-4, {' + _O4 + '}]]'),
}


def test_shipped_recipe_chains_the_model_cards_phases(T, R):
    recipe = R.RECIPES["shipped"]
    assert [p.name for p in recipe.phases] == ["cpu", "gpu-1", "gpu-2", "end-1", "end-4"]
    assert [p.start for p in recipe.phases] == ["scratch"] + ["previous"] * 4
    assert [p.gpu for p in recipe.phases] == [False, True, True, False, False]
    assert [p.steps for p in recipe.phases] == [4650, 767, 196, 350, 600]  # steps 6,563 in all
    cpu = recipe.phases[0]
    assert [legacy(s) for s in cpu.stages] == OLD_STAGES and cpu.seed == 1234 and cpu.init == R.Init()
    for p in recipe.phases[1:]:
        seed, stages = SCRIPTS[p.name]
        assert p.seed == seed and p.stages == tuple(R.Stage.from_list(s) for s in json.loads(stages)), p.name
        assert p.mix == (("niah", 0.8), ("kv", 0.2)) and p.recap_p == 0.6
        assert dict(p.task) == json.loads("{" + _TASK + "}" if p.name.startswith("end") else
                                          '{"value_fmt": "number", "max_needles": 6, "edge_p": 0.2}')
        assert p.init.free_rope_channels == (p.name == "end-4")
    args = T.build_parser().parse_args([])
    run = lambda name, device: T.run_settings(recipe.phase(name), args, device)
    assert run("gpu-1", "cuda") == dict(R.RUN_DEFAULTS, workers=8, query_block=2048, score_budget_mb=4096,
                                        eval_every=250, eval_n=8, ckpt_minutes=100, shard_mb=15)
    assert run("gpu-2", "cpu") == dict(R.RUN_DEFAULTS, threads=2, query_block=2048, eval_every=250, eval_n=8)
    assert run("end-4", "cpu") == dict(R.RUN_DEFAULTS, threads=2, eval_every=1000, eval_n=8)
    assert run("cpu", "cpu") == R.RUN_DEFAULTS
    args = T.build_parser().parse_args(["--threads", "2", "--eval-every", "7"])
    assert T.run_settings(recipe.phase("end-1"), args, "cpu")["eval_every"] == 7  # the command line wins


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_toy_recipe_chains_stops_and_resumes(T, R, tmp_path, monkeypatch, pool, capsys):
    """Two phases (the second a GPU one, from the first one's end): --max-steps stops mid-phase, a rerun
    resumes it, stops before the GPU phase on a machine without CUDA, --gpu-phases-on-cpu runs it from the
    first phase's export; the result is the same as an uninterrupted run, and a third rerun has nothing to do."""
    tiny = dict(R.CONFIG, hidden_size=64, head_dim=32, qk_rope_head_dim=8, partial_rotary_factor=0.25,
                q_lora_rank=32, o_lora_rank=16, index_head_dim=16, moe_intermediate_size=32)
    opts = dict(mix=(("niah", 1.0),), task={"value_fmt": "number", "max_needles": 2})
    toy = R.Recipe("toy", (
        R.Phase("a", (R.Stage("a1", 2, 256, 1, True, 1e-3, **opts),), seed=7),
        R.Phase("b", (R.Stage("b1", 1, 256, 1, False, 1e-3, **opts),), seed=8, start="previous", gpu=True,
                init=R.Init(free_rope_channels=True), run_cpu={"threads": 1}),
    ), config=tiny).validated()
    monkeypatch.setitem(R.RECIPES, "toy", toy)
    monkeypatch.setattr(T.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(T.tasks.TokenPool, "corpus", classmethod(lambda cls, *a, **kw: pool))
    run = lambda out, *more: T.main(["--recipe", "toy", "--out", str(out), "--eval-every", "0", *more])

    one = tmp_path / "interrupted"
    assert run(one, "--max-steps", "1") == 0
    assert torch.load(one / "a" / "checkpoint.pt", weights_only=False)["step"] == 1
    assert not (one / "a" / "model").exists() and not (one / "b").exists()
    capsys.readouterr()
    assert run(one) == 3  # phase a resumed and finished; no CUDA for phase b
    said = capsys.readouterr()
    assert "resumed from" in said.out and "stopped before phase b: it needs a CUDA GPU" in said.err
    assert (one / "a" / "model" / "config.json").is_file() and not (one / "b").exists()
    assert run(one, "--gpu-phases-on-cpu") == 0
    out = capsys.readouterr().out
    assert "phase a: done" in out and f"initialised from {one / 'a' / 'model'} (RoPE channels freed)" in out
    assert json.loads((one / "b" / "phase.json").read_text())["init_from"] == str(one / "a" / "model")
    assert json.loads((one / "b" / "model" / "config.json").read_text()) == json.loads(json.dumps(tiny))

    two = tmp_path / "straight"
    assert run(two, "--gpu-phases-on-cpu") == 0
    for phase in ("a", "b"):
        w1, w2 = _weights(one / phase / "model"), _weights(two / phase / "model")
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1), phase
    steps = [json.loads(x)["step"] for x in (one / "a" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # step 1 once, before the stop; step 2 after the resume
    assert run(one, "--gpu-phases-on-cpu") == 0  # nothing left to do
    assert "phase b: done" in capsys.readouterr().out
    assert len((one / "b" / "log.jsonl").read_text().splitlines()) == 1
