"""What the CPU computes with, and the indexer-key dtype that follows from it: one choice for the engine, the
app, the CLI, the evaluation and the benchmarks.

The lightning indexer streams every stored key per decode step (262,144 keys per CSA layer at 1M tokens).
bf16 keys halve those bytes, but only pay where the CPU multiplies bf16 natively (AMX tiles, AVX512-BF16
dot products) or on a GPU; elsewhere (AVX2, AVX-512 without BF16) each step converts the whole key cache
to fp32 first, and fp32 keys are faster (issue 25: on an AVX2 EPYC decode at 1M took 72.9 ms with bf16
keys, 29.2 ms with fp32). fp16 keys have the same conversion cost on such CPUs, so they are not offered.

`detect()` reads the CPU once: /proc/cpuinfo flags and torch's own checks (`torch.cpu._is_*_supported`,
which also see whether the OS enables AMX), capped at torch's kernel dispatch level
(`torch.backends.cpu.get_cpu_capability()`, which ATEN_CPU_CAPABILITY can lower). `choose(device)` is the
choice; `resolve(spec, device)` turns a user's "auto" / "bfloat16" / "float32" / "model" into a dtype.

The same test picks prefill's compute dtype for the HCA layers' dense pass over the compressed entries (half
of a 1M-token prefill): `resolve_prefill` gives bf16 where the CPU computes bf16 natively (~2.5x faster on
that pass with AMX), else the model's dtype. The cost, measured on the shipped model: see tests/test_isa.py
and BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch

# what --index-dtype accepts everywhere; "model" (the model's own dtype) only where a caller offers it
CHOICES = ("auto", "bfloat16", "float32")
_NAMED = {"bfloat16": torch.bfloat16, "float32": torch.float32}
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # the /proc/cpuinfo flags that matter here
TIERS = ("baseline", "AVX2", "AVX-512", "AVX512-BF16", "AMX")  # weakest first
NATIVE_BF16 = ("AVX512-BF16", "AMX")


@dataclass(frozen=True)
class CpuIsa:
    """The CPU as far as the indexer keys care: its name, flags, torch's dispatch level and the tier."""
    model: str
    flags: tuple[str, ...]  # those of FLAGS the CPU reports (sorted)
    capability: str  # torch's kernel dispatch level: DEFAULT, AVX2, AVX512, ...
    tier: str  # one of TIERS

    @property
    def native_bf16(self) -> bool:
        return self.tier in NATIVE_BF16


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> tuple[str, ...] | None:
    """Those of FLAGS in /proc/cpuinfo (None: no /proc/cpuinfo, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return tuple(sorted(f for f in FLAGS if f in have))
    except OSError:
        return None
    return ()


def _torch_check(name: str) -> bool | None:
    fn = getattr(torch.cpu, f"_is_{name}_supported", None)  # private but present in torch 2.13
    try:
        return None if fn is None else bool(fn())
    except Exception:  # noqa: BLE001 -- a check that cannot run tells nothing
        return None


def tier_of(flags, capability: str = "AVX512") -> str:
    """The strongest tier `flags` reach, at most what torch's dispatch `capability` allows."""
    f, cap = set(flags), capability.upper()
    if cap == "DEFAULT":  # no vector kernels dispatched at all (ATEN_CPU_CAPABILITY=default)
        return "baseline"
    if cap == "AVX2":  # AVX-512 kernels not dispatched (an AVX2 CPU, or ATEN_CPU_CAPABILITY=avx2)
        f -= {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    if "avx2" not in f:
        return "baseline"
    if {"amx_bf16", "amx_tile"} <= f:
        return "AMX"
    if "avx512_bf16" in f:
        return "AVX512-BF16"
    return "AVX-512" if "avx512f" in f else "AVX2"


@functools.lru_cache(maxsize=1)
def detect() -> CpuIsa:
    """This machine's CPU (read once per process)."""
    cap = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    checks = {"avx2": "avx2", "avx512f": "avx512", "avx512_bf16": "avx512_bf16", "amx_tile": "amx_tile"}
    have = set(flags or ())
    for flag, check in checks.items():
        ok = _torch_check(check)
        if ok is False:  # torch (cpuinfo) sees the OS state too, e.g. AMX not enabled for this process
            have.discard(flag)
        elif ok and flags is None:
            have.add(flag)
    if flags is None and "amx_tile" in have:
        have.add("amx_bf16")
    return CpuIsa(cpu_model(), tuple(sorted(have)), cap, tier_of(have, cap))


def choose(device: str | torch.device = "cpu", isa: CpuIsa | None = None) -> torch.dtype:
    """The indexer-key dtype for `device`: bf16 on CUDA and where the CPU computes in bf16, else fp32."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if (isa or detect()).native_bf16 else torch.float32


def resolve(spec: str | torch.dtype | None, device: str | torch.device = "cpu",
            what: str = "index dtype") -> torch.dtype | None:
    """A dtype from what the user asked: "auto" (choose), "bfloat16", "float32", "model" / None (the model's
    dtype: None), or a torch dtype as it is."""
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    if spec == "auto":
        return choose(device)
    if spec == "model":
        return None
    if spec not in _NAMED:
        raise ValueError(f"{what}: expected one of {CHOICES + ('model',)}, got {spec!r}")
    return _NAMED[spec]


def resolve_prefill(spec: str | torch.dtype | None, device: str | torch.device = "cpu",
                    model_dtype: torch.dtype = torch.float32) -> torch.dtype | None:
    """The HCA dense pass's prefill dtype (Transformer.set_prefill_dtype) from what the user asked: "auto" is
    bf16 where `choose` picks bf16 keys (the same test: the CPU computes bf16 natively, or a GPU), "model" /
    None the model's own (the reference). None when that is the model's dtype: nothing to convert."""
    got = resolve(spec, device, "prefill dtype")
    return None if got == model_dtype else got


def name(dtype: torch.dtype | None) -> str:
    return "model" if dtype is None else str(dtype).removeprefix("torch.")


def explain(spec: str | torch.dtype | None, device: str | torch.device = "cpu") -> str:
    """One line for headers and logs, e.g. `bfloat16 (auto: AMX computes bf16)`."""
    got = name(resolve(spec, device))
    if spec != "auto":
        return f"{got} (as asked)"
    if torch.device(device).type != "cpu":
        return f"{got} (auto: {torch.device(device).type})"
    isa = detect()
    return f"{got} (auto: {isa.tier}{' computes bf16' if isa.native_bf16 else ', no native bf16'})"


__all__ = ["CHOICES", "CpuIsa", "TIERS", "choose", "cpu_flags", "cpu_model", "detect", "explain", "name", "resolve",
           "resolve_prefill", "tier_of"]
