"""Quantised matmuls on this CPU: runtime/qlinear.py's "reference" against its "fast" dequantisation.

    python bench/quant_matmul.py [--shapes flash|tiny] [--tokens 1 2048] [--dtypes bf16 fp32] [--threads 2]

For each V4 weight shape, activation dtype and token count M it times forward (y = x W^T with the
weight dequantised on the fly) on both implementations and checks that their outputs are bitwise
equal; "W only" rows time the dequantisation alone. Times are the best and the median of --repeats
calls after one warm-up. glibc is tuned as bench/cli.py's workers are (no mmap for large blocks, no
trim: freed blocks are reused without page faults) unless --no-malloc-tuning. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime.memory import mallopt  # noqa: E402
from runtime.qlinear import quantize_linear, set_quant_impl  # noqa: E402

# name, kind, out, in: V4-Flash routed expert (FP4) and attention (FP8) weights
SHAPES = {
    "flash": [("expert w1", "fp4", 2048, 4096), ("expert w2", "fp4", 4096, 2048),
              ("attn wq_b", "fp8", 32768, 1024), ("attn wo_b", "fp8", 4096, 8192)],
    "tiny": [("tiny", "fp4", 256, 512), ("tiny", "fp8", 300, 200)],
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def timed(fn, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(best ms, median ms, last result) over `repeats` calls after one warm-up."""
    out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1e3)
    return min(times), statistics.median(times), out


def quantized(kind: str, out: int, inp: int, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out, bias=False)
    lin.weight.data = torch.randn(out, inp, generator=g) * 0.02
    return quantize_linear(lin, kind)


def run(shapes, tokens, dtypes, repeats, prefill_repeats):
    rows = []
    for name, kind, out, inp in shapes:
        mod = quantized(kind, out, inp)
        for dname in dtypes:
            dtype = DTYPES[dname]
            cases = [("W only", None)] + [(str(m), m) for m in tokens]
            for label, m in cases:
                if m is None:
                    call = lambda: mod.dequantized(dtype)  # noqa: E731
                else:
                    x = torch.randn(m, inp, generator=torch.Generator().manual_seed(1)).to(dtype)
                    call = lambda: mod(x)  # noqa: E731
                n = repeats if m is None or m <= 64 else prefill_repeats
                res = {}
                for impl in ("reference", "fast"):
                    set_quant_impl(mod, impl)
                    res[impl] = timed(call, n)
                ref, fast = res["reference"], res["fast"]
                same = torch.equal(ref[2].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                   fast[2].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
                rows.append((f"{name} [{out}, {inp}]", kind, label, dname, ref[0], ref[1], fast[0], fast[1],
                             ref[0] / fast[0], "yes" if same else "NO"))
                print(_row(rows[-1]), flush=True)
                del res, ref, fast
    return rows


def _row(r) -> str:
    shape, kind, m, dt, rmin, rmed, fmin, fmed, speed, same = r
    return (f"| {shape} | {kind} | {m} | {dt} | {rmin:.2f} | {rmed:.2f} | {fmin:.2f} | {fmed:.2f} "
            f"| {speed:.1f}x | {same} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="flash")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2048], help="M: tokens per call")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed calls for W only and M <= 64")
    p.add_argument("--prefill-repeats", type=int, default=3, help="timed calls for M > 64")
    p.add_argument("--no-malloc-tuning", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if not args.no_malloc_tuning:
        mallopt({_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1})
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"glibc tuning {'off' if args.no_malloc_tuning else 'on'}; best / median of the timed calls, ms")
    print("| weight | kind | M | dtype | reference best | reference median | fast best | fast median "
          "| speedup (best) | bitwise |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        rows = run(SHAPES[args.shapes], args.tokens, args.dtypes, args.repeats, args.prefill_repeats)
    return 0 if all(r[-1] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
