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
