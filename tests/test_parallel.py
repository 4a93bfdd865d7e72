"""Tensor and expert parallelism on CPU with gloo: N ranks under torchrun give what one process gives.

Each case writes a tiny random checkpoint in official naming (heads, output groups, experts and vocabulary
all split across ranks; hash- and score-routed MoE; sliding, CSA and HCA layers; hc_mult 2 and 4), runs
tests/dist_worker.py once alone and once under `torch.distributed.run` with 2 or 4 gloo ranks, and compares
logits (float32, relative error <= 1e-5), every CSA selection (identical), and the captured weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, write_corpus
from live_server import free_port
from hf_oracle import CSA, HCA, SL, tiny_config
from runtime.config import ConfigError, ModelConfig
from runtime.model import Transformer
from runtime.parallel import Shard, slice_of
from runtime.plan import check_world_size
from runtime.quant import save_official

WORKER = Path(__file__).resolve().parent / "dist_worker.py"


def parallel_config(**over) -> dict:
    cfg = tiny_config(vocab_size=128, num_attention_heads=8, o_groups=4, n_routed_experts=8, num_experts_per_tok=2,
                      index_n_heads=4, index_topk=8, layer_types=[SL, CSA, HCA, CSA],
                      mlp_layer_types=["hash_moe", "moe", "moe", "moe"], compress_rates={CSA: 4, HCA: 16})
    cfg.update(over)
    return cfg


def write_checkpoint(folder: Path, cfg: dict, quantize: bool = False, seed: int = 0) -> Path:
    """Random weights everywhere (sinks, mHC, ape and gate biases too, so any mix-up of slices shows)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model = Transformer(ModelConfig.from_dict(cfg)).init_weights(seed)
        for name, p in model.named_parameters():
            if name.endswith(("attn_sink", "ape", "_base")):
                p.add_(torch.randn(p.shape) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(torch.randn(b.shape) * 0.1)
    state = {k: v for k, v in model.state_dict().items() if "inv_freq" not in k}
    save_official(state, folder, cfg, quantize=quantize, block=4)
    return folder


def run(model: Path, out: Path, world: int, nodes: int = 1, load: bool = True, **kw) -> list[dict]:
    """tests/dist_worker.py alone (world 1), under one torchrun, or under `nodes` torchrun agents meeting
    through a c10d rendezvous as separate machines would (here all on loopback)."""
    args = [str(WORKER), "--model", str(model), "--out", str(out)] + [f"--{k}={v}" for k, v in kw.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if world == 1:
        cmds = [[sys.executable] + args]
    elif nodes == 1:
        cmds = [torchrun + ["--standalone", f"--nproc-per-node={world}"] + args]
    else:
        endpoint = f"127.0.0.1:{free_port()}"
        cmds = [torchrun + [f"--nnodes={nodes}", f"--nproc-per-node={world // nodes}", "--rdzv-backend=c10d",
                            f"--rdzv-endpoint={endpoint}", f"--rdzv-id={out.name}"] + args for _ in range(nodes)]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    for p in procs:
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-6000:]
        # a follower prints any operation it failed ("[rank 1] forward: ValueError: ..."): none may have
        assert not re.search(r"\[rank \d+\] \w+: \w+", log), log[-6000:]
    return [torch.load(f"{out}.{r}.pt") for r in range(world)] if load else []


def assert_same_run(one: dict, ranks: list[dict]) -> None:
    for r, got in enumerate(ranks):
        # every rank returns the full logits, and they agree bit for bit across ranks
        assert torch.equal(got["logits"], ranks[0]["logits"]), f"rank {r} logits differ from rank 0"
        for layer, rec in got["records"].items():
            sel = ranks[0]["records"][layer]["selected"]
            if sel is not None:
                assert torch.equal(rec["selected"], sel), f"rank {r} layer {layer}: CSA selection differs"
    got, want = ranks[0]["logits"], one["logits"]
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-5, rel
    assert one["records"].keys() == ranks[0]["records"].keys()
    for layer, rec in one["records"].items():
        other = ranks[0]["records"][layer]
        assert torch.equal(other["positions"], rec["positions"])
        if rec["selected"] is not None:
            assert torch.equal(other["selected"], rec["selected"]), f"layer {layer}: CSA selection differs"
            torch.testing.assert_close(other["scores"], rec["scores"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other["mass"], rec["mass"], rtol=1e-5, atol=1e-6)
        if rec["weights"] is not None:
            torch.testing.assert_close(other["weights"], rec["weights"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world,hc,nodes", [(2, 2, 1), (4, 4, 1), (4, 2, 2)])
def test_ranks_match_one_process(tmp_path, world, hc, nodes):
    model = write_checkpoint(tmp_path / "m", parallel_config(hc_mult=hc))
    one = run(model, tmp_path / "one", 1)[0]
    ranks = run(model, tmp_path / "dist", world, nodes)
    assert ranks[0]["world"] == world
    sel = [r["selected"] for r in one["records"].values() if r["selected"] is not None]
    assert sel and all((s >= 0).sum() > 0 for s in sel)  # the CSA layers did select entries
    assert_same_run(one, ranks)


@pytest.mark.parametrize("world", [2, 4])
def test_quantized_checkpoint_kept_quantized_across_ranks(tmp_path, world):
    model = write_checkpoint(tmp_path / "q", parallel_config(hc_mult=4), quantize=True, seed=1)
    one = run(model, tmp_path / "one", 1)[0]
    ref = run(model, tmp_path / "ref", 1, quantized="dequantize")[0]
    ranks = run(model, tmp_path / "dist", world)
    assert {"torch.float8_e4m3fn", "torch.int8"} <= one["dtypes"], one["dtypes"]  # FP8 and packed FP4 kept
    assert one["weight_bytes"] < ref["weight_bytes"] / 2
    assert torch.equal(one["logits"], ref["logits"])  # the reference matmuls dequantise exactly
    assert_same_run(one, ranks)
    # each rank holds its slice: 1/world of the routed experts' (packed) bytes, and less than the whole
    assert ranks[0]["expert_bytes"] * world == one["expert_bytes"]
    assert ranks[0]["weight_bytes"] < one["weight_bytes"]


def test_world_size_refused_before_loading(tmp_path):
    cfg = ModelConfig.from_dict(parallel_config())
    check_world_size(cfg, 4)
    with pytest.raises(ConfigError, match="world size 3 does not divide num_attention_heads=8"):
        check_world_size(cfg, 3)
    with pytest.raises(ConfigError, match="o_groups=4"):
        check_world_size(ModelConfig.from_dict(parallel_config(num_attention_heads=16)), 8)


def test_slices_follow_the_official_scheme():
    cfg = ModelConfig.from_dict(parallel_config())
    s = Shard(1, 2)
    H, d = cfg.num_attention_heads, cfg.head_dim
    assert slice_of("layers.1.attn.wq_b.weight", cfg, s) == (0, H // 2 * d, H * d)
    assert slice_of("layers.1.attn.wo_a.weight", cfg, s) == (0, 2 * cfg.o_lora_rank, 4 * cfg.o_lora_rank)
    assert slice_of("layers.1.attn.wo_b.weight", cfg, s) == (1, 2 * cfg.o_lora_rank, 4 * cfg.o_lora_rank)
    assert slice_of("layers.1.attn.attn_sink", cfg, s) == (0, 4, 8)
    assert slice_of("embed.weight", cfg, s) == (0, 64, 128)
    assert slice_of("layers.1.ffn.experts.3.w1.weight", cfg, s) is False
    assert slice_of("layers.1.ffn.experts.4.w1.weight", cfg, s) is None
    for replicated in ("layers.1.attn.wq_a.weight", "layers.1.attn.indexer.wq_b.weight",
                       "layers.1.attn.compressor.wkv.weight", "layers.1.ffn.shared_experts.w1.weight",
                       "layers.1.ffn.gate.weight", "layers.1.hc_attn_fn", "norm.weight"):
        assert slice_of(replicated, cfg, s) is None, replicated


def test_sessions_under_torchrun_match_one_process(tmp_path):
    """Counterfactual (checkpoint / restore), undo (rewind), two sessions, a snapshot adopted by every rank:
    rank 0's engine with a follower gives what one process gives, token for token."""
    model = write_checkpoint(tmp_path / "m", parallel_config(vocab_size=8192, index_topk=16))
    shutil.copy(REPO / "assets" / "tokenizer.json", model / "tokenizer.json")
    write_corpus(tmp_path / "docs", lines=40)
    results = []
    for world in (1, 2):
        out = tmp_path / f"w{world}" / "engine"
        out.parent.mkdir()
        run_files = run(model, out, world, engine=tmp_path / "docs", load=False)
        assert run_files == []
        results.append(json.loads(Path(f"{out}.0.json").read_text()))
    one, two = results
    assert one["a1"]["ids"] and one["cf"]["old"] == one["a2"]["ids"]  # the scenario ran as meant
    assert one["after_undo"] == one["after_cf"]  # undo came back to the state before that turn
    for key in one:
        got, want = two[key], one[key]
        if isinstance(want, dict) and "sources" in want:
            assert got["ids"] == want["ids"], key
            assert [x[:3] for x in got["sources"]] == [x[:3] for x in want["sources"]], key
            assert all(abs(a[3] - b[3]) <= 1e-4 for a, b in zip(got["sources"], want["sources"])), key
        else:
            assert got == want, key


def _ask(model: Path, corpus: Path, snapdir: Path, world: int) -> dict:
    argv = ["-m", "runtime", "ask", "--corpus", str(corpus), "--question", "What is the secret launch code?",
            "--model", str(model), "--max-new-tokens", "6", "--chunk-size", "128", "--snapshot-dir", str(snapdir),
            "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
                              if world > 1 else []) + argv
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1, done.stdout  # rank 0 alone prints; the other ranks follow silently
    return lines[0]


def test_engine_ask_under_torchrun_matches_one_process(tmp_path):
    """The CLI's engine path (corpus prefill, capture, provenance, then a snapshot adopted by every rank)."""
    model = write_checkpoint(tmp_path / "m", parallel_config(vocab_size=8192, index_topk=16))
    shutil.copy(REPO / "assets" / "tokenizer.json", model / "tokenizer.json")
    corpus = tmp_path / "docs"
    write_corpus(corpus, lines=60)
    one = _ask(model, corpus, tmp_path / "snap1", 1)
    two = _ask(model, corpus, tmp_path / "snap2", 2)
    assert one["timings"]["corpus_source"] == two["timings"]["corpus_source"] == "prefill"
    assert two["answer"] == one["answer"]
    key = lambda s: (s["file"], s["line_start"], s["line_end"], s["layers"])  # noqa: E731
    assert [key(s) for s in two["sources"]] == [key(s) for s in one["sources"]]
    for a, b in zip(one["sources"], two["sources"]):
        assert abs(a["weight"] - b["weight"]) <= 1e-5
    again = _ask(model, corpus, tmp_path / "snap2", 2)  # rank 0 reads the snapshot; every rank adopts it
    assert again["timings"]["corpus_source"] == "snapshot"
    assert again["answer"] == one["answer"] and [key(s) for s in again["sources"]] == [key(s) for s in one["sources"]]


@pytest.mark.parametrize("idle", [False, True])
def test_dead_rank_fails_the_call_and_does_not_hang(tmp_path, idle):
    """Rank 1 vanishes mid-run (or while the app idles: the heartbeat finds it); rank 0 fails the call with
    code rank_failed, calls on_failure once, and returns instead of hanging."""
    model = write_checkpoint(tmp_path / "m", parallel_config())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           "--model", str(model), "--out", str(tmp_path / "die"), "--die-after", "3"] + (["--idle"] if idle else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    report = (tmp_path / "die.0.txt").read_text() if (tmp_path / "die.0.txt").exists() else done.stderr[-3000:]
    assert "RankFailed code=rank_failed" in report and "failures=1" in report, report


def test_app_under_torchrun_answers_as_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 launch.py`: rank 0 serves the page, rank 1 follows; same answer and chips."""
    from helpers import ask, client, load, text_of
    from live_server import Server

    model = write_checkpoint(tmp_path / "m", parallel_config(vocab_size=8192, index_topk=16))
    shutil.copy(REPO / "assets" / "tokenizer.json", model / "tokenizer.json")
    paths = write_corpus(tmp_path / "docs", lines=40)
    answers = []
    for ranks in (1, 2):
        with Server(model, tmp_path / f"snaps{ranks}", temp_dir=tmp_path / f"gradio{ranks}", ranks=ranks,
                    timeout=180) as s:
            c = client(s.url)
            load(c, paths)
            out = ask(c)
            # everything the page got: the chat and the source chips, less the speed figures
            page = json.dumps(out, sort_keys=True, default=str)
            answers.append(re.sub(r"[\d.]+ tokens/s|first token [\d.]+ s", "", page))
            chat = out[0] if isinstance(out, (list, tuple)) else out
            assert text_of(chat[-1]).strip(), out
        assert s.proc.wait(timeout=60) is not None  # stopping rank 0 ends every rank: nothing left hanging
    assert answers[0] == answers[1]
