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
    from bench.split import CATEGORIES

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
    assert "an older page" not in text and text.endswith(KEEP_MARKER + "\n## Load test\n\nmeasured elsewhere\n")
    assert (tmp_path / "benchmarks.svg").read_text().startswith("<svg")


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


def test_layer_timer_restores_the_runtime():
    import torch

    import runtime.attention as ra
    import runtime.model as rm
    from bench.configs import preset
    from bench.split import LayerTimer
    from runtime.config import ModelConfig
    from runtime.model import Transformer

    before = (ra.select_topk, rm.hc_weights, rm.hc_collapse, rm.hc_expand)
    model = Transformer(ModelConfig.from_dict(preset("micro"))).init_weights(0).eval()
    ids = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        timer = LayerTimer(model)
        try:
            assert ra.select_topk is not before[0]
            out = model(ids)
        finally:
            timer.close()
    assert torch.equal(out, ref)
    assert (ra.select_topk, rm.hc_weights, rm.hc_collapse, rm.hc_expand) == before
    assert "scores" not in model.layers[3].attn.indexer.__dict__
    assert not model.layers[0].attn._forward_hooks and not model.layers[0].attn._forward_pre_hooks


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
