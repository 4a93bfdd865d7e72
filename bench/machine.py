"""The machine beside every table (its CPU as runtime/isa.py reads it), the matmul peak of a dtype, and process
memory readings.

Also the helpers both worker kinds share (bench/worker.py, bench/compare.py): dtype names, the device
sync and the peak-memory reading. This module imports nothing from bench/, so neither imports the other.
"""

from __future__ import annotations

import os
import platform
import statistics
import time


def print_json(out: dict, path: str | None = None) -> None:
    """A standalone bench script's result: indented JSON on stdout, and in `path` when given."""
    import json

    text = json.dumps(out, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                parts = v.split()
                out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def machine_info(device: str = "cpu") -> dict:
    import torch

    from runtime.isa import detect

    mi, cpu = meminfo(), detect()
    info = {
        "cpu_model": cpu.model,
        "cpu_flags": list(cpu.flags),
        "isa": cpu.tier,  # runtime/isa.py: AMX, AVX512-BF16, AVX-512, AVX2 or baseline
        "torch_cpu_capability": cpu.capability,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_bytes": mi.get("MemTotal"),
        "mem_available_bytes": mi.get("MemAvailable"),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=p.name, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda)
    return info


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def torch_dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def matmul_peak(dtype, device: str = "cpu", n: int = 2048, reps: int = 5) -> dict:
    """FLOP/s of an n^3 matmul in `dtype`: best (the peak) and median of `reps` timed runs after a warm-up."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        times.append(time.perf_counter() - t)
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "reps": reps,
            "peak_flops": flops / min(times), "median_flops": flops / statistics.median(times)}


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Best read+write bytes/s of a preallocated copy (the memory-bandwidth anchor)."""
    import torch

    x = torch.ones(nbytes // 4, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM / VmSize / VmPeak of this process, bytes."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM", "VmSize", "VmPeak")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        import resource
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux `clear_refs` 5); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mem(device: str) -> dict:
    """Peak memory so far: this process's VmRSS / VmHWM / ..., and on CUDA the allocator's peaks."""
    out = {"rss": proc_status()}
    if device.startswith("cuda"):
        import torch
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved"] = torch.cuda.max_memory_reserved()
    return out


def small_op_latency(threads_list=(1, 2), reps: int = 300) -> dict[int, float]:
    """Median microseconds of a small parallelisable op (softmax over 64 x 512) per torch thread count.

    On a contended machine an OpenMP parallel region waits for every thread to be scheduled, so a
    multi-thread count can be many times slower than one thread on the small ops decode is made of.
    """
    import statistics

    import torch

    old = torch.get_num_threads()
    x = torch.randn(64, 512)
    out = {}
    try:
        for n in threads_list:
            torch.set_num_threads(n)
            for _ in range(20):
                x.softmax(-1)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                x.softmax(-1)
                ts.append(time.perf_counter() - t)
            out[n] = 1e6 * statistics.median(ts)
    finally:
        torch.set_num_threads(old)
    return out
