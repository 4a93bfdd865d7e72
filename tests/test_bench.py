"""Smoke test of the benchmark harness (bench/): a tiny config at ~1k tokens, no timing assertions."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_end_to_end(tmp_path):
    """One length through a worker process, --compare against transformers and eager, markdown + plot."""
    from bench.cli import KEEP_MARKER, main
    from runtime.timing import CATEGORIES

    out, md = tmp_path / "r.json", tmp_path / "B.md"
    md.write_text("an older page\n" + KEEP_MARKER + "\n## Load test\n\nmeasured elsewhere\n")
    # index_topk >= the number of entries: no exact indexer ties (ReLU zeros), whose order is arbitrary in
    # both implementations, so the logits must agree to fp32 rounding
    rc = main(["--config", "micro", "--set", "index_topk=512", "--contexts", "1024", "--chunk", "300",
               "--decode-tokens", "4", "--repeats", "1", "--threads", "1", "--profile", "--compare",
               "--compare-contexts", "512", "--compare-repeats", "1", "--hf-full-max", "512", "--eager-max", "512",
               "--mem-limit-gb", "8", "--decode-ref-context", "512", "--json", str(out), "--write-md", str(md), "--results-dir", str(tmp_path)])
    assert rc == 0
    rs = json.loads(out.read_text())
    (r,) = rs["runs"]
    assert r["status"] == "ok" and r["context"] == r["prefill_tokens"] == 1024
    assert r["prefill_tok_s"] > 0 and r["decode_steps"] == 4 and len(r["chunk_s_first_run"]) == 4
    assert r["memory"]["rss"]["VmHWM"] >= r["rss_before_prefill"] > 0
    cb = r["cache_after_prefill"]
    assert cb["length"] == 1024 and cb["components"]["total"] > 0
    assert cb["components"]["total"] < cb["dense_equivalent"]
    assert set(r["split_prefill_s"]) == set(CATEGORIES)
    assert abs(sum(r["split_prefill_s"].values()) - r["prefill_s"]) < 0.05 * r["prefill_s"] + 1e-3
    for cat in ("sliding_attn", "hca_attn", "csa_attn", "moe", "mhc"):
        assert r["split_prefill_s"][cat] > 0 and r["split_decode_ms"][cat] > 0, cat
    fp = r["flops_prefill"]
    assert all(fp["useful"][c] <= fp["performed"][c] * (1 + 1e-9) for c in fp["useful"])
    assert r["profile"]["prefill_chunk"]["top"] and r["profile"]["decode_16"]["top"]
    (c,) = rs["compare"]
    assert c["status"] == "ok"
    assert set(c["seconds"]) == {"runtime_full", "hf_full", "runtime_eager", "runtime_chunked", "hf_chunked"}
    for key in ("err_full_all_positions", "err_chunked_last_position", "err_sparse_vs_eager", "err_eager_vs_hf"):
        assert c[key] < 1e-4, (key, c[key])
    for ref in ("hf", "eager"):
        assert c["selection_check"][ref]["bad_logits_unexplained"] == 0
        assert c["selection_check"][ref]["max_err_where_selection_agrees"] < 1e-4
    assert r["decode_ref_context"] == 512 and r["decode_ratio_vs_ref"] > 0
    text = md.read_text()
    assert "## Targets" in text and "benchmarks.svg" in text and "| 1,024 |" in text
    assert "## Latest runs" in text and "### `r.json`: preset `micro`, random weights" in text
    assert "an older page" not in text and text.endswith(KEEP_MARKER + "\n## Load test\n\nmeasured elsewhere\n")
    assert (tmp_path / "benchmarks.svg").read_text().startswith("<svg")
    from runtime import isa

    st, m = rs["meta"]["settings"], rs["meta"]["machine"]  # the header: CPU, ISA, threads, the engine's key choice
    assert st["index_dtype"] == isa.name(isa.choose()) and st["index_dtype_asked"] == "auto"
    assert m["isa"] == isa.detect().tier and f"ISA {m['isa']}" in text and st["index_layout"] in text


def test_page_keeps_the_latest_run_of_each_kind(tmp_path):
    """--write-md: a newer run replaces the section of its kind (same weights folder, device, dtype, threads and
    lengths) and leaves the others; every target row names the weights, the CPU and the run it comes from."""
    import copy

    from bench.cli import KEEP_MARKER, write_md

    two = json.loads((ROOT / "bench/results/default-model-2threads-1m-c.json").read_text())
    one = json.loads((ROOT / "bench/results/default-model-1thread-1m-b.json").read_text())
    newer = copy.deepcopy(two)
    newer["meta"].update(started="2030-01-01T00:00:00+00:00", label="step 9,999, 2 threads",
                         argv=["--model", "assets/model", "--contexts", "4096,1048576", "--threads", "2",
                               "--json", "bench/results/new.json", "--label", "step 9,999, 2 threads", "--write-md"])
    newer["meta"]["model"].pop("checkpoint", None)  # named by its --label
    newer["meta"]["model"].pop("weights_sha256", None)  # (a recorded digest of the shipped weights would win)
    newer["runs"][1]["decode_ratio_vs_ref"] = 1.3
    md = tmp_path / "B.md"
    md.write_text("an older page\n" + KEEP_MARKER + "\n## Load test\n")
    write_md([newer, one, two], md, tmp_path)

    text = md.read_text()
    assert text.endswith(KEEP_MARKER + "\n## Load test\n")
    assert "`new.json`" in text and "default-model-2threads-1m-c.json" not in text
    assert "`default-model-1thread-1m-b.json`" in text
    assert "`python -m bench --model assets/model --contexts 4096,1048576 --threads 2 --json bench/results/new.json`" in text
    rows = [r.split(" | ") for r in text.splitlines() if r.startswith("| Decode at 1,048,576")]
    assert [(r[1][:5], r[3].split(" (")[0], r[4].split("; ")[1], r[5]) for r in rows] == [
        ("1.30x", "step 9,999", "2 threads", "`new.json` |"),
        ("1.65x", "shipped model", "1 thread", "`default-model-1thread-1m-b.json` |")]
    assert all(r[4].split("; ")[0].endswith(" vCPU") for r in rows)  # the CPU, with the threads after it
    assert len(json.loads((tmp_path / "benchmarks.json").read_text())) == 2


def test_targets_keep_cpus_apart(tmp_path):
    """A run on another CPU (an AVX2 EPYC) replaces nothing measured on the Xeon: each target gets a row per CPU,
    every row from one set, and each section's header names the CPU, its ISA, the threads and the key layout."""
    import copy

    from bench import report
    from bench.cli import write_md

    two = json.loads((ROOT / "bench/results/default-model-2threads-1m-c.json").read_text())
    one = json.loads((ROOT / "bench/results/default-model-1thread-1m-b.json").read_text())
    epyc = copy.deepcopy(two)
    epyc["meta"]["machine"].update(cpu_model="AMD EPYC 7B13 64-Core Processor", cpu_flags=["avx2"], isa="AVX2",
                                   torch_cpu_capability="AVX2")
    epyc["meta"]["settings"].update(index_dtype="float32", index_layout="float32 (auto: AVX2, no native bf16)")
    epyc["meta"].update(started="2030-01-01T00:00:00+00:00",
                        argv=["--model", "assets/model", "--contexts", "4096,1048576", "--threads", "2",
                              "--json", "bench/results/epyc.json"])
    epyc["runs"][1]["decode_ratio_vs_ref"] = 4.21
    md = tmp_path / "B.md"
    write_md([epyc, one, two], md, tmp_path)
    text = md.read_text()
    assert "`epyc.json`" in text and "`default-model-2threads-1m-c.json`" in text  # both sections kept
    rows = [r.split(" | ") for r in text.splitlines() if r.startswith("| Decode at 1,048,576")]
    assert [(r[1][:5], r[4], r[5]) for r in rows] == [
        ("1.38x", "Intel Xeon with AMX, 2 vCPU; 2 threads", "`default-model-2threads-1m-c.json` |"),
        ("1.65x", "Intel Xeon with AMX, 2 vCPU; 1 thread", "`default-model-1thread-1m-b.json` |"),
        ("4.21x", "AMD EPYC 7B13 64-Core with AVX2, 2 vCPU; 2 threads", "`epyc.json` |")]
    prefill = [r for r in text.splitlines() if r.startswith("| Prefill of 1,048,576")]
    assert len(prefill) == 3 and sum("AMD EPYC" in r for r in prefill) == 1
    head = report.console(epyc).splitlines()
    assert "AMD EPYC 7B13 64-Core Processor (ISA AVX2, torch kernels AVX2)" in head[0]
    assert "torch threads 2" in head[0] and "indexer keys float32 (auto: AVX2, no native bf16)" in head[1]
    old = report.console(two).splitlines()  # recorded before the ISA was: read from its CPU flags
    assert "(ISA AMX)" in old[0] and "indexer keys bfloat16" in old[1]


def test_archive_is_reproducible(tmp_path):
    """bench/archive_results.py: the same members give the same bytes, whatever the order they were added in;
    the originals leave the tree only once the archive holds them."""
    from bench.archive_results import main, read_members

    def add(archive, order, keep):
        src = tmp_path / f"src-{archive}"
        src.mkdir()
        specs = []
        for name in order:
            (src / name).write_text(f"{name} " * 100)
            specs.append(f"{src / name}=history/{name}")
        assert main((["--keep"] if keep else []) + ["--archive", str(tmp_path / archive)] + specs) == 0
        return src

    add("a.tar.xz", ["x.txt", "y.txt"], keep=True)
    src = add("b.tar.xz", ["y.txt", "x.txt"], keep=False)
    assert (tmp_path / "a.tar.xz").read_bytes() == (tmp_path / "b.tar.xz").read_bytes()
    assert read_members(tmp_path / "a.tar.xz") == {"history/x.txt": b"x.txt " * 100, "history/y.txt": b"y.txt " * 100}
    assert not any(src.iterdir())


def test_flop_model_useful_work_is_chunking_invariant():
    """`useful` FLOPs are per token / per entry, so any chunking of the same prefill counts the same."""
    from bench.configs import preset
    from bench.flops import prefill_flops
    from runtime.config import ModelConfig

    c = ModelConfig.from_dict(preset("micro"))
    a = prefill_flops(c, 700, 700, keep=0)
    b = prefill_flops(c, 700, 97, keep=0)
    for cat, v in a["useful"].items():
        assert abs(v - b["useful"][cat]) <= 1e-9 * v, cat
    # performed work of the window band depends on the chunking (the band of a block), never below useful
    assert sum(b["performed"].values()) >= sum(b["useful"].values())


def test_memory_guard_turns_an_overrun_into_an_error():
    """Under the worker's address-space limit a too-large allocation raises instead of waking the OOM killer."""
    code = textwrap.dedent("""
        import torch
        from bench.machine import proc_status
        from bench.worker import set_memory_guard
        set_memory_guard(proc_status()["VmSize"] + (256 << 20), "cpu")
        try:
            torch.empty(1 << 30, dtype=torch.uint8).fill_(1)
        except RuntimeError as e:
            print("guarded:", "allocate" in str(e).lower())
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "guarded: True" in out.stdout, out.stdout + out.stderr


def test_flop_model_matches_torch_flop_counter():
    """The analytical count of bench/flops.py against torch's FlopCounterMode on the real runtime calls
    (the model adds the few elementwise multiply-add reductions the counter ignores)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.configs import preset
    from bench.flops import chunk_flops
    from runtime.config import ModelConfig
    from runtime.model import Transformer

    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # the fused passes over HCA entries

    def flash_flops(q, k, v, *args, out_shape=None, **kwargs):  # the counter does not know this CPU op
        return 2 * 2 * q[0] * q[1] * q[2] * k[2] * q[3]  # logits and values: [B, heads, L, S] x d each

    cfg = ModelConfig.from_dict(preset("micro"))
    model = Transformer(cfg).init_weights(0).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 1200), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()
    with torch.inference_mode():
        model(ids[:, :700], cache, logits_to_keep=1)
        for S, keep in ((499, 1), (1, 0)):
            P = cache.length
            with FlopCounterMode(display=False, custom_mapping={flash: flash_flops}) as fc:
                model(ids[:, P : P + S], cache, logits_to_keep=keep)
            counted = fc.get_total_flops()
            modelled = sum(chunk_flops(cfg, P, S, keep, model.layers[0].attn.score_budget)["performed"].values())
            assert counted <= modelled <= 1.03 * counted, (S, counted, modelled)
