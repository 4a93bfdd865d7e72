"""runtime/plan.py, `python -m runtime plan`, the CUDA memory budget and the Docker image: the presets against
the released checkpoints' sizes, the planner's tensors and bytes against the runtime's model, a written
quantised checkpoint and a real cache, the world-size rule, the CLI, and the image's pins."""

import json
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import SHIPPED

from runtime import plan as P
from runtime.__main__ import main
from runtime.budget import Budget
from runtime.checkpoint import KEEP_FP32
from runtime.config import CSA, HCA, SLIDING, ConfigError, ModelConfig
from runtime.model import Transformer
from runtime.quant import save_official

REPO = Path(__file__).resolve().parent.parent
GB = 10 ** 9

# A tiny config with every layer type and both router kinds; sizes that FP4 packing and 1x32 scales accept.
TINY = {"model_type": "deepseek_v4", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "head_dim": 32, "qk_rope_head_dim": 8, "q_lora_rank": 32, "o_groups": 2,
        "o_lora_rank": 16, "compress_ratios": [0, 4, 128, 4, 0], "num_hash_layers": 1, "moe_intermediate_size": 32,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8,
        "sliding_window": 16, "hc_mult": 2, "hc_sinkhorn_iters": 3, "max_position_embeddings": 4096}


def tiny() -> ModelConfig:
    return ModelConfig.from_dict(TINY)


def flash() -> ModelConfig:
    return ModelConfig.from_dict(P.preset("flash"))


def pro() -> ModelConfig:
    return ModelConfig.from_dict(P.preset("pro"))


# ------------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name,size_gb,schedule", [("flash", 156.0, (2, 21, 20)), ("pro", 850.7, (0, 30, 31))])
def test_presets_weigh_what_the_released_checkpoints_do(name, size_gb, schedule):
    """At W=1 and bf16, the weights as stored add up to the released checkpoint (without the MTP block)."""
    raw = P.preset(name)
    cfg = ModelConfig.from_dict(raw)
    assert tuple(cfg.layer_types.count(t) for t in (SLIDING, CSA, HCA)) == schedule
    assert P.formats(raw) == ("fp8", "fp4")
    total = sum(P.weight_bytes(cfg, 1, "bfloat16").values())
    assert total == pytest.approx(size_gb * GB, rel=0.01)


def test_flash_and_its_mtp_block_are_the_checkpoints_bytes():
    """The released Flash holds 159,609,485,896 bytes of tensors (spec §5.1): the planner's W=1 weights plus the
    MTP block the runtime does not load -- one sliding-window layer with a score-routed MoE, e_proj and h_proj
    (FP8 [D, D]), enorm, hnorm and norm (bf16 [D]) and its own hc_head (fp32) -- add up to exactly that."""
    raw, cfg = P.preset("flash"), flash()
    D, E = cfg.hidden_size, cfg.n_routed_experts
    block = ModelConfig.from_dict({**raw, "num_hidden_layers": 1, "compress_ratios": [0], "num_hash_layers": 0})
    mtp = sum(P.tensor_bytes(n, s, 1, 2, E) for n, s in P.tensors(block) if n.startswith("layers."))
    mtp += 2 * (D * D + (D // P.FP8_BLOCK) ** 2) + 3 * D * 2 + (cfg.hc_mult * cfg.hc_mult * D + cfg.hc_mult + 1) * 4
    assert sum(P.weight_bytes(cfg, 1, "bfloat16").values()) + mtp == 159_609_485_896


def test_cache_per_token_is_the_specs():
    """bf16 cache and indexer keys: Flash 6,880 and Pro 9,848 bytes per token (spec §4.4)."""
    assert P.cache_bytes_per_token(flash(), 2, 2) == 6880
    assert P.cache_bytes_per_token(pro(), 2, 2) == 9848


# ------------------------------------------------------------------------------------------------ weights
def test_tensors_are_the_runtime_models():
    with torch.device("meta"):
        model = Transformer(tiny())
    want = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert dict(P.tensors(tiny())) == want


def test_the_planners_patterns_are_the_runtimes():
    """plan.py cannot import torch: its copies of the loader's and writer's name patterns must stay equal."""
    import inspect

    from runtime.engine import Engine
    from runtime.quant import FP4_NAMES, FP8_NAMES

    assert P.FP32.pattern == KEEP_FP32.pattern and P.FP8_LINEARS.pattern == FP8_NAMES.pattern
    names = [n for n, _ in P.tensors(tiny())]
    assert [bool(P.EXPERTS.search(n)) for n in names] == [bool(FP4_NAMES.search(n)) for n in names]
    assert inspect.signature(Engine).parameters["chunk_size"].default == P.DEFAULT_CHUNK


def test_unquantised_bytes_are_the_runtime_models():
    """Formats "float" (an unquantised checkpoint): the plan is the model's own bytes, fp32 and int64 included."""
    with torch.device("meta"):
        model = Transformer(tiny())
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # what load_model keeps in fp32
        if KEEP_FP32.search(name):
            t.data = t.data.float()
    have = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert sum(P.weight_bytes(tiny(), 1, "bfloat16", "float", "float").values()) == have


def test_quantised_bytes_are_a_written_checkpoints(tmp_path):
    """FP8 + 128x128 scales and FP4 + 1x32 scales, per tensor, against safetensors written as released."""
    model = Transformer(tiny()).init_weights()
    save_official(model.state_dict(), tmp_path, TINY, quantize=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert P.formats(raw) == ("fp8", "fp4")
    stored = {}
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for name in f.keys():
            t = f.get_slice(name)
            el = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "F32": 4, "I64": 8}[t.get_dtype()]
            weight = name.removesuffix(".scale") + ".weight" if name.endswith(".scale") else name
            stored[weight] = stored.get(weight, 0) + math.prod(t.get_shape()) * el
    planned = {n: P.tensor_bytes(n, s, 1, 4, tiny().n_routed_experts) for n, s in P.tensors(tiny())}
    assert planned == stored
    assert sum(P.weight_bytes(tiny(), 1, "float32").values()) == sum(stored.values())


def test_shards_are_the_runtime_models():
    """Each rank's tensors under W=2, as the sharded model builds them (runtime/parallel.py)."""
    parallel = pytest.importorskip("runtime.parallel")
    E = tiny().n_routed_experts
    for rank in range(2):
        with torch.device("meta"):
            model = Transformer(tiny(), parallel.Shard(rank, 2))
        want = {n: list(t.shape) for n, t in model.state_dict().items()}
        planned = {n: P.local_shape(n, s, 2) for n, s in P.tensors(tiny())
                   if P.tensor_bytes(n, s, 2, 2, E, rank=rank)}
        assert planned == want


def test_sharding_divides_what_is_split():
    cfg, W = flash(), 8
    one, eight = P.weight_bytes(cfg, 1), P.weight_bytes(cfg, W)
    for group in ("indexer", "compressors", "shared experts", "router", "norms + mHC"):  # replicated (sinks aside)
        assert eight[group] == pytest.approx(one[group], rel=0.01), group
    assert eight["routed experts"] * W == one["routed experts"]
    assert eight["embed + head"] * W == one["embed + head"]
    assert one["attention"] / W < eight["attention"] < one["attention"] / 4  # wq_a and wkv stay whole
    # each rank holds a disjoint eighth of the experts: the ranks' bytes add up to the whole
    E = cfg.n_routed_experts
    name, shape = "layers.5.ffn.experts.37.w1.weight", (cfg.moe_intermediate_size, cfg.hidden_size)
    assert [P.tensor_bytes(name, shape, W, 2, E, rank=r) > 0 for r in range(W)] == [r == 37 // 32 for r in range(W)]


# ------------------------------------------------------------------------------------------------ world size
def test_a_wrong_world_size_names_the_constraint():
    with pytest.raises(ConfigError, match=r"world size 3 does not divide o_groups=8 \(wo_a is split by output group\)"):
        P.check_world_size(flash(), 3)
    with pytest.raises(ConfigError) as e:
        P.check_world_size(flash(), 16)
    assert "o_groups=8" in str(e.value) and "num_attention_heads" not in str(e.value)
    assert "Valid world sizes for this model: 1, 2, 4, 8" in str(e.value)
    for w in (1, 2, 4, 8):
        P.check_world_size(flash(), w)
    P.check_world_size(pro(), 16)
    with pytest.raises(ConfigError, match="n_routed_experts=4"):
        P.check_world_size(ModelConfig.from_dict({**TINY, "num_attention_heads": 8, "o_groups": 8}), 8)
    with pytest.raises(ConfigError, match="positive"):
        P.check_world_size(flash(), 0)
    with pytest.raises(ConfigError, match="o_groups=8"):
        P.plan(flash(), 16, 141 << 30)


# ------------------------------------------------------------------------------------------------ cache
def test_cache_parts_are_a_real_caches_after_a_prefill():
    """A bf16 tiny model prefilled in chunks: entries and windows exactly as planned, buffers within the bound;
    runtime/budget.py's estimate is the same arithmetic."""
    torch.manual_seed(0)
    cfg = tiny()
    model = Transformer(cfg).init_weights().to(torch.bfloat16)
    cache = model.new_cache(index_dtype=torch.bfloat16)
    T = 384  # a multiple of both rates: whole entries only
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    with torch.no_grad():
        for s in range(0, T, 100):
            model(ids[:, s:s + 100], cache)
    have = cache.nbytes()
    planned = P.cache_parts(cfg, T, 2, 2)
    for part in ("window", "csa_entries", "indexer_keys", "hca_entries"):
        assert have[part] == planned[part], part
    assert 0 < have["buffers"] <= planned["buffers"]
    budget = Budget(cfg, torch.bfloat16, torch.bfloat16)
    assert budget.estimate_cache_bytes(T) == sum(planned.values())
    assert budget.cache_bytes_per_token() == P.cache_bytes_per_token(cfg, 2, 2)


def test_the_shipped_models_budget_and_plan_agree():
    cfg = ModelConfig.from_dict(json.loads((SHIPPED / "config.json").read_text()))
    for dtype, index in ((torch.float32, None), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)):
        b = Budget(cfg, dtype, index)
        el, iel = dtype.itemsize, None if index is None else index.itemsize
        assert b.cache_bytes_per_token() == P.cache_bytes_per_token(cfg, el, iel)
        assert b.estimate_cache_bytes(1 << 20) == sum(P.cache_parts(cfg, 1 << 20, el, iel).values())


# ------------------------------------------------------------------------------------------------ the plan
def test_workspace_constants_are_the_attentions():
    from runtime.attention import Attention

    with torch.device("meta"):
        attn = Attention(tiny(), 1)
    assert (attn.score_budget, attn.query_block) == (P.SCORE_BUDGET, P.QUERY_BLOCK)


def test_plan_totals_and_what_fits():
    cfg = flash()
    p = P.plan(cfg, 8, 141 << 30, 1 << 20, 1, name="Flash")
    assert p.total == p.weights_total + p.session_bytes + p.workspace_total
    assert p.workspace["CUDA context"] == P.CUDA_CONTEXT and p.workspace["NCCL buffers"] == P.NCCL_BUFFERS
    assert P.plan(cfg, 1, 141 << 30, 1 << 20).workspace["NCCL buffers"] == 0
    assert p.fits and p.sessions_that_fit == (p.gpu_memory - p.weights_total - p.workspace_total) // p.session_bytes
    k = p.sessions_that_fit
    assert P.plan(cfg, 8, 141 << 30, 1 << 20, k).fits and not P.plan(cfg, 8, 141 << 30, 1 << 20, k + 1).fits
    # too many sessions: the context that would fit them does, one token more per session does not
    q = P.plan(cfg, 8, 141 << 30, 1 << 20, k + 1)
    assert "does not fit" in q.table() and f"{k} session(s) of 1,048,576 tokens would fit" in q.table()
    n = q.context_that_fits
    assert 0 < n < 1 << 20
    assert P.plan(cfg, 8, 141 << 30, n, k + 1).fits and not P.plan(cfg, 8, 141 << 30, n + 2000, k + 1).fits
    # weights that do not fit: the smallest world size that does is named
    r = P.plan(pro(), 4, 141 << 30, 1 << 20)
    assert not r.fits and r.fitting_world_size == 8 and "world size 8 would fit it" in r.table()
    assert P.plan(pro(), 8, 80 << 30, 1 << 20).fitting_world_size == 16


def test_plan_or_refuse():
    p = P.plan_or_refuse(flash(), 8, 141 << 30, context=1 << 20, sessions=2)
    assert p.fits and p.sessions == 2
    with pytest.raises(P.DoesNotFit) as e:
        P.plan_or_refuse(pro(), 4, 141 << 30, context=1 << 20, name="DeepSeek-V4-Pro")
    assert e.value.code == "does_not_fit" and not e.value.plan.fits
    assert str(e.value) == e.value.table and "DeepSeek-V4-Pro on 4 GPUs" in e.value.table
    assert "does not fit" in e.value.table and "routed experts" in e.value.table
    # a model folder: its config.json, its storage formats (unquantised here) and its name
    p = P.plan_or_refuse(SHIPPED, 1, 8 << 30, dtype="float32")
    assert p.name == "model" and (p.linear_format, p.expert_format) == ("float", "float")
    shipped = ModelConfig.from_dict(json.loads((SHIPPED / "config.json").read_text()))
    assert p.weights_total == sum(P.weight_bytes(shipped, 1, "float32", "float", "float").values())
    assert P.plan_or_refuse(P.preset("flash"), 8, 141 << 30).linear_format == "fp8"


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_table_and_json(capsys):
    argv = ["plan", "--preset", "flash", "--world-size", "8", "--gpu-memory", "141GB", "--context", "1048576"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("DeepSeek-V4-Flash on 8 GPUs of 141.0 GiB") and "fits:" in text
    for label in ("routed experts", "CSA entries", "indexer keys", "HCA entries", "CUDA context", "total"):
        assert label in text
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = P.plan(flash(), 8, 141 << 30, 1 << 20)
    assert out["fits"] and out["weights_total"] == want.weights_total and out["total"] == want.total
    assert out["cache_per_session"] == want.cache and out["cache_bytes_per_token"] == 6880


def test_cli_does_not_fit_and_check(capsys):
    argv = ["plan", "--preset", "pro", "--world-size", "4", "--gpu-memory", "141GB", "--context", "1048576"]
    assert main(argv) == 0 and "does not fit" in capsys.readouterr().out
    assert main(argv + ["--check"]) == 1
    capsys.readouterr()
    assert main(argv + ["--check", "--json"]) == 1 and json.loads(capsys.readouterr().out)["fits"] is False


def test_cli_model_folder_and_errors(capsys, tmp_path):
    assert main(["plan", "--model", str(SHIPPED), "--gpu-memory", "8G", "--dtype", "float32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["formats"] == {"linears": "float", "routed_experts": "float"} and out["fits"]
    assert main(["plan", "--preset", "flash", "--world-size", "3", "--gpu-memory", "80GB", "--json"]) == 2
    err = json.loads(capsys.readouterr().out)
    assert set(err) == {"error", "code"} and "does not divide o_groups=8" in err["error"]
    assert main(["plan", "--model", str(tmp_path), "--gpu-memory", "80GB", "--json"]) == 2
    assert "no model config" in json.loads(capsys.readouterr().out)["error"]
    assert main(["plan", "--preset", "flash", "--json"]) == 2  # --gpu-memory is required
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------ CUDA budget
def test_budget_reads_the_devices_free_memory(monkeypatch):
    calls = []

    def mem_get_info(device):
        calls.append(torch.device(device))
        return 10 << 30, 80 << 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 << 30)
    b = Budget(tiny(), torch.bfloat16, device=torch.device("cuda:1"))
    n, why = b.memory_budget()
    assert calls == [torch.device("cuda:1")]
    assert n == int(0.8 * (11 << 30)) and "11.0 GiB" in why and "cuda:1" in why  # free + the allocator's cached
    calls.clear()
    n, why = Budget(tiny(), torch.bfloat16).memory_budget()  # the CPU: /proc/meminfo, as before
    assert calls == [] and "cuda" not in why and n is not None


def test_the_engine_budgets_its_models_device(shipped_engine):
    assert torch.device(shipped_engine.budget.device) == shipped_engine.model.device


# ------------------------------------------------------------------------------------------------ Docker
def test_dockerfile_pins_are_requirements():
    """The image installs requirements.txt as it is, with torch's CUDA build of the same version."""
    docker = (REPO / "Dockerfile").read_text()
    req = (REPO / "requirements.txt").read_text()
    torch_pin = re.search(r"^torch==(\S+)", req, re.M).group(1)
    assert re.search(r"^FROM python:3\.11", docker, re.M)
    install = " ".join(line for line in docker.replace("\\\n", " ").splitlines() if "pip install" in line)
    assert "-r requirements.txt" in install
    assert re.findall(r"torch==([0-9.]+)\+", install) == [torch_pin]
    assert re.search(r"download\.pytorch\.org/whl/\$\{?TORCH_CUDA", install)
    assert 'ENTRYPOINT ["scripts/docker-entrypoint.sh"]' in docker
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= {p.strip("/") for p in ignored}


def _fake_bin(folder: Path, name: str, body: str) -> None:
    p = folder / name
    p.write_text("#!/usr/bin/env bash\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("gpus,nproc,want", [
    ("4", None, "torchrun --nproc-per-node 4 launch.py --host 0.0.0.0 --model /models/X"),
    ("8", "2", "torchrun --nproc-per-node 2 launch.py --host 0.0.0.0 --model /models/X"),
    ("1", None, "python launch.py --host 0.0.0.0 --model /models/X"),
    ("0", None, "python launch.py --host 0.0.0.0 --model /models/X")])
def test_docker_entrypoint(tmp_path, gpus, nproc, want):
    """The GPU count (from torch) picks torchrun over every GPU, NPROC overrides it; one GPU or none: no torchrun."""
    _fake_bin(tmp_path, "python", f'if [ "$1" = -c ]; then echo {gpus}; else echo python "$@"; fi')
    _fake_bin(tmp_path, "torchrun", 'echo torchrun "$@"')
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **({"NPROC": nproc} if nproc else {})}
    p = subprocess.run(["bash", str(REPO / "scripts" / "docker-entrypoint.sh"), "--model", "/models/X"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == want
    assert os.access(REPO / "scripts" / "docker-entrypoint.sh", os.X_OK)


# ------------------------------------------------------------------------------------------------ the pages
def _rows(text: str, header: str) -> list[list[str]]:
    body = text.split(header, 1)[1].split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines()[2:]]


def _cells(p, names: list[str]) -> list[str]:
    g = P.GiB
    cell = {"weights / GPU": f"{p.weights_total / g:.1f} GiB", "cache per 1M session": f"{p.session_bytes / g:.2f} GiB",
            "workspace": f"{p.workspace_total / g:.2f} GiB", "total, one session": f"{p.total / g:.1f} GiB",
            "fits": "yes" if p.fits else f"no: {p.fitting_world_size} GPUs would",
            "1M sessions that fit": str(p.sessions_that_fit) if p.fits or "fits" in names
            else f"none: needs {p.fitting_world_size} GPUs"}
    return [cell[n] for n in names]


@pytest.mark.parametrize("page,section", [("README.md", "## Running the real DeepSeek-V4"),
                                          ("BENCHMARKS.md", "## Memory plan: DeepSeek-V4-Flash and -Pro")])
def test_the_pages_tables_are_the_planners(page, section):
    text = (REPO / page).read_text().split(section, 1)[1]
    header = "| model | GPUs | "
    names = [c.strip() for c in text.split(header, 1)[1].split("\n", 1)[0].strip("|").split("|")]
    names = ["model", "GPUs"] + names
    rows = _rows(text, header)
    assert len(rows) >= 10
    for row in rows:
        cfg = {"Flash": flash, "Pro": pro}[row[0]]()
        mem = int(row[2].split()[0]) << 30
        if row[3].startswith("refused"):
            with pytest.raises(ConfigError):
                P.check_world_size(cfg, int(row[1]))
            continue
        p = P.plan(cfg, int(row[1]), mem, 1 << 20, 1)
        assert row[3:] == _cells(p, names[3:]), row
    if page == "BENCHMARKS.md":
        printed = text.split("```\n", 1)[1].split("\n```", 1)[0]
        assert printed == P.plan(flash(), 8, 141 << 30, 1 << 20, 1, name="DeepSeek-V4-Flash").table()


def test_the_planner_imports_no_torch():
    code = "import sys, runtime.plan; assert not {'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
