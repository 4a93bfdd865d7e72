"""runtime/isa.py: the indexer-key dtype chosen per CPU and device, with each capability forced, and the same
choice (or the same override) taken by the engine, the app, the CLI, the evaluation and the benchmarks."""

import pytest
import torch

from runtime import isa

AMX = ("amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f")
AVX512_BF16 = ("avx2", "avx512_bf16", "avx512f")
AVX512 = ("avx2", "avx512f")
AVX2 = ("avx2",)


def forced(flags, capability="AVX512") -> isa.CpuIsa:
    return isa.CpuIsa("forced CPU", tuple(sorted(flags)), capability, isa.tier_of(flags, capability))


@pytest.fixture
def cpu(monkeypatch):
    """cpu(flags, capability) makes runtime.isa.detect() report that CPU for the rest of the test."""
    def force(flags, capability="AVX512"):
        monkeypatch.setattr(isa, "detect", lambda: forced(flags, capability))
    return force


@pytest.mark.parametrize("flags, capability, tier, dtype", [
    (AMX, "AVX512", "AMX", torch.bfloat16),
    (AVX512_BF16, "AVX512", "AVX512-BF16", torch.bfloat16),
    (AVX512, "AVX512", "AVX-512", torch.float32),
    (AVX2, "AVX2", "AVX2", torch.float32),
    (AMX, "AVX2", "AVX2", torch.float32),  # ATEN_CPU_CAPABILITY=avx2: torch dispatches no AVX-512 kernels
    (AMX, "DEFAULT", "baseline", torch.float32),
    ((), "DEFAULT", "baseline", torch.float32),  # not x86 (no flags read)
])
def test_choice_per_capability(flags, capability, tier, dtype):
    c = forced(flags, capability)
    assert c.tier == tier and isa.choose("cpu", c) == dtype
    assert isa.choose("cuda", c) == isa.choose("cuda:1", c) == torch.bfloat16  # a GPU computes bf16 natively


def test_detect_reads_proc_flags_and_torch_checks(monkeypatch):
    """/proc/cpuinfo's flags, less what torch's checks deny (AMX the OS did not enable); without
    /proc/cpuinfo, torch's checks alone."""
    monkeypatch.setattr(isa, "cpu_flags", lambda: AMX)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    isa.detect.cache_clear()
    try:
        assert isa.detect().tier == "AVX512-BF16"
        monkeypatch.setattr(isa, "cpu_flags", lambda: None)
        for name, ok in (("avx2", True), ("avx512", True), ("avx512_bf16", False), ("amx_tile", False)):
            monkeypatch.setattr(torch.cpu, f"_is_{name}_supported", lambda ok=ok: ok, raising=False)
        isa.detect.cache_clear()
        assert isa.detect().tier == "AVX-512" and isa.choose() == torch.float32
    finally:
        isa.detect.cache_clear()


def test_resolve_names_and_override(cpu):
    cpu(AVX2, "AVX2")
    assert isa.resolve("auto") == torch.float32 and isa.resolve("auto", "cuda") == torch.bfloat16
    assert isa.resolve("bfloat16") == torch.bfloat16 and isa.resolve("float32", "cuda") == torch.float32
    assert isa.resolve("model") is None and isa.resolve(None) is None
    assert isa.resolve(torch.bfloat16) == torch.bfloat16
    assert isa.explain("auto") == "float32 (auto: AVX2, no native bf16)"
    assert isa.explain("bfloat16") == "bfloat16 (as asked)"
    with pytest.raises(ValueError, match="float16"):
        isa.resolve("float16")


@pytest.mark.parametrize("flags, capability, want", [(AMX, "AVX512", torch.bfloat16), (AVX2, "AVX2", torch.float32)])
def test_engine_app_cli_eval_and_bench_take_one_choice(cpu, tiny_model_dir, flags, capability, want):
    from app.settings import Settings
    from app.ui import load_engine
    from bench.cli import index_dtype_name, parser as bench_parser
    from launch import build_parser as launch_parser
    from runtime.__main__ import _engine, build_parser as cli_parser
    from runtime.engine import Engine
    from runtime.evaluate import add_eval_arguments

    import argparse

    cpu(flags, capability)
    engine = Engine.from_dir(tiny_model_dir)
    assert engine.index_dtype == want and engine.new_session().cache.index_dtype == want
    assert engine.budget.index_dtype == want  # the memory budget follows the chosen keys
    assert engine.cache_bytes_per_token() == Engine.from_dir(tiny_model_dir, index_dtype=want).cache_bytes_per_token()

    app_args = launch_parser().parse_args([])
    settings = Settings(model_dir=tiny_model_dir, device="cpu", index_dtype=app_args.index_dtype)
    assert settings.resolved_index_dtype() == want and load_engine(settings)[0].index_dtype == want

    ask = cli_parser(False).parse_args(["ask", "--corpus", "x", "--question", "q", "--model", str(tiny_model_dir),
                                        "--device", "cpu"])
    assert _engine(ask)[0].index_dtype == want

    assert add_eval_arguments(argparse.ArgumentParser()).parse_args(["niah"]).index_dtype == "auto"
    assert index_dtype_name(bench_parser().parse_args([])) == isa.name(want)


def test_override_wins_everywhere(cpu, tiny_model_dir):
    from app.settings import Settings
    from bench.cli import index_dtype_name, parser as bench_parser
    from launch import build_parser as launch_parser
    from runtime.__main__ import _engine, build_parser as cli_parser
    from runtime.engine import Engine, EngineError

    cpu(AVX2, "AVX2")  # auto would be float32
    assert Engine.from_dir(tiny_model_dir, index_dtype="bfloat16").index_dtype == torch.bfloat16
    assert launch_parser().parse_args(["--index-dtype", "bfloat16"]).index_dtype == "bfloat16"
    assert Settings(device="cpu", index_dtype="bfloat16").resolved_index_dtype() == torch.bfloat16
    ask = cli_parser(False).parse_args(["ask", "--corpus", "x", "--question", "q", "--model", str(tiny_model_dir),
                                        "--device", "cpu", "--index-dtype", "bfloat16"])
    assert _engine(ask)[0].index_dtype == torch.bfloat16
    assert index_dtype_name(bench_parser().parse_args(["--index-dtype", "bfloat16"])) == "bfloat16"
    assert index_dtype_name(bench_parser().parse_args(["--index-dtype", "model"])) == "model"
    cpu(AMX)  # auto would be bfloat16
    assert Engine.from_dir(tiny_model_dir, index_dtype="float32").index_dtype == torch.float32
    with pytest.raises(EngineError, match="index dtype"):
        Engine.from_dir(tiny_model_dir, index_dtype="int8")


def test_bench_worker_stores_the_keys_it_is_sent(cpu):
    """The parent names the choice once; the worker's caches (the engine's prefill and decode step) store it."""
    from bench import configs
    from bench.cli import index_dtype_name, parser as bench_parser
    from bench.worker import run

    cpu(AVX2, "AVX2")
    name = index_dtype_name(bench_parser().parse_args([]))
    cfg = configs.preset("micro", {})
    spec = {"kind": "runtime", "preset": "micro", "config": cfg, "seed": 0, "device": "cpu", "dtype": "float32",
            "index_dtype": name, "threads": 1, "chunk": 256, "decode_tokens": 2, "decode_ref_context": 0,
            "repeats": 1, "context": 512, "split": False, "profile": False, "peak_n": 64}
    res, rc = run(spec)
    assert rc == 0, res.get("error")
    keys = res["cache_after_prefill"]["components"]["indexer_keys"]
    assert name == "float32" and keys == (512 // 4) * cfg["index_head_dim"] * 4


# ------------------------------------------------------------------------------------------ prefill's HCA pass
def test_prefill_dtype_per_capability_and_names(cpu):
    cpu(AMX)
    assert isa.resolve_prefill("auto") == torch.bfloat16
    assert isa.resolve_prefill("auto", "cuda", torch.bfloat16) is None  # already the model's dtype
    assert isa.resolve_prefill("model") is None and isa.resolve_prefill("float32") is None
    cpu(AVX512)
    assert isa.resolve_prefill("auto") is None and isa.resolve_prefill("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="prefill dtype"):
        isa.resolve_prefill("int8")


def test_load_model_engine_cli_and_bench_take_one_prefill_choice(cpu, tiny_model_dir, monkeypatch):
    import runtime
    from bench.cli import parser as bench_parser, prefill_dtype_name
    from launch import build_parser as launch_parser
    from runtime.__main__ import _engine, build_parser as cli_parser
    from runtime.engine import EngineError

    def chosen(model):
        return {b.attn.dense_dtype for b in model.layers}

    cpu(AMX)
    monkeypatch.delenv("LONGLENS_PREFILL_DTYPE", raising=False)  # conftest pins the reference for the suite
    assert chosen(runtime.load_model(tiny_model_dir)) == {torch.bfloat16}
    assert runtime.load_model(tiny_model_dir).prefill_dtype == torch.bfloat16
    assert chosen(runtime.load_model(tiny_model_dir, prefill_dtype="model")) == {None}
    assert chosen(runtime.Engine.from_dir(tiny_model_dir).model) == {torch.bfloat16}
    assert prefill_dtype_name(bench_parser().parse_args([])) == "bfloat16"
    ask = ["ask", "--corpus", "x", "--question", "q", "--model", str(tiny_model_dir), "--device", "cpu"]
    assert chosen(_engine(cli_parser(False).parse_args(ask))[0].model) == {torch.bfloat16}
    assert chosen(_engine(cli_parser(False).parse_args(ask + ["--prefill-dtype", "model"]))[0].model) == {None}
    assert launch_parser().parse_args(["--prefill-dtype", "float32"]).prefill_dtype == "float32"
    monkeypatch.setenv("LONGLENS_PREFILL_DTYPE", "model")  # the environment stands in for every default
    assert chosen(runtime.Engine.from_dir(tiny_model_dir).model) == {None}
    cpu(AVX2, "AVX2")
    monkeypatch.delenv("LONGLENS_PREFILL_DTYPE")
    assert chosen(runtime.load_model(tiny_model_dir)) == {None}
    assert prefill_dtype_name(bench_parser().parse_args([])) == "model"
    with pytest.raises(EngineError, match="prefill dtype"):
        runtime.Engine.from_dir(tiny_model_dir, prefill_dtype="int8")


def test_bf16_hca_pass_against_the_reference(monkeypatch):
    """The fused HCA pass in bf16 (what auto picks on AMX) against the model's own dtype, on a tiny model whose
    HCA layer holds up to 128 entries per query: it really runs in bf16, and only in prefill; the HCA layer's
    output moves by bf16 rounding (< 1e-2 of its scale) and so do the logits, the greedy tokens agree (but
    for a near-tie or two), and the decode steps after it stay close. index_topk covers every CSA entry: a
    random indexer's near-ties would turn any perturbation into other picks (the shipped model's picks were
    measured equal: BENCHMARKS.md)."""
    from hf_oracle import tiny_config
    from runtime.attention import dense_attention as real_dense
    from runtime.config import ModelConfig
    from runtime.model import Transformer
    import runtime.attention as attention

    seen = []

    def spy(q, entries, scale, parts=1):
        seen.append((q.shape[1], q.dtype, entries.dtype))
        return real_dense(q, entries, scale, parts)

    monkeypatch.setattr(attention, "dense_attention", spy)
    cfg = ModelConfig.from_dict(tiny_config(compress_rates={"compressed_sparse_attention": 4,
                                                            "heavily_compressed_attention": 8}, index_topk=512))
    model = Transformer(cfg).init_weights(5).eval()
    hca = next(b.attn for b in model.layers if b.attn.layer_type == "heavily_compressed_attention")
    ids = torch.randint(0, cfg.vocab_size, (1, 1040), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, dtype in (("ref", None), ("bf16", torch.bfloat16)):
        model.set_prefill_dtype(dtype)
        seen.clear()
        hca_out = []
        hook = hca.register_forward_hook(lambda m, i, o: hca_out.append(o.detach().clone()))
        cache = model.new_cache()
        with torch.no_grad():
            logits = torch.cat([model(c, cache) for c in ids[:, :1024].split(256, dim=1)], dim=1)
            steps = torch.cat([model(t.view(1, 1), cache) for t in ids[0, 1024:]], dim=1)
        hook.remove()
        assert seen and all(q_dtype == torch.float32 for sq, q_dtype, _ in seen if sq == 1)  # decode: fp32
        out[name] = logits, steps, torch.cat(hca_out[:4], 1), {(q, e) for sq, q, e in seen if sq > 1}
    assert out["ref"][3] == {(torch.float32, torch.float32)}
    assert out["bf16"][3] == {(torch.bfloat16, torch.bfloat16)}

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    (ref, ref_steps, ref_hca, _), (got, got_steps, got_hca, _) = out["ref"], out["bf16"]
    assert 0 < rel(got_hca, ref_hca) < 1e-2  # bf16 rounding shows, and stays small
    assert rel(got, ref) < 1e-2  # random logits hold near-ties: a few greedy picks may swap, no more
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.98
    assert rel(got_steps, ref_steps) < 1e-2
