"""What tensor/expert parallelism costs on one CPU: `python -m bench` alone and under torchrun, same cores.

    python bench/ranks.py --model assets/model --ranks 2 --contexts 4096,32768 [--write-md BENCHMARKS.md]

Runs `python -m bench` once as one process with R threads and once under `torchrun --nproc-per-node R` with
one thread per rank (gloo), back to back on the same machine, and prints prefill tokens/s and decode
ms/token side by side with their ratio. On one CPU the ranks share the cores and talk through loopback
sockets, so this measures the collectives' overhead (two all-reduces per layer plus the vocabulary
gather per token), not a speed-up: that needs more machines or GPUs. --write-md replaces the section
between this script's markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench/ranks.py: begin -->", "<!-- bench/ranks.py: end -->"


def bench(model: str, contexts: str, ranks: int, threads: int, decode: int, out: Path) -> dict:
    # the eager step in both: the compiled one (runtime/compiled.py) steps aside under a process group, and
    # the comparison is of the collectives, not of the two step implementations
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "LONGLENS_DECODE": "eager"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = ["-m", "bench", "--model", model, "--contexts", contexts, "--threads", str(threads), "--repeats", "1",
            "--decode-tokens", str(decode), "--no-split", "--json", str(out)]
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    subprocess.run([sys.executable, *runner, *args], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def table(one: dict, many: dict, ranks: int, threads: int) -> str:
    m = one["meta"]["machine"]
    cpu = f"{m.get('cpu_model', 'CPU')} ({', '.join(m.get('cpu_flags') or [])}), {m.get('usable_cpus')} vCPU"
    lines = [f"CPU: {cpu}. One process with {threads} threads against {ranks} gloo ranks with one thread each; "
             "the eager decode step in both (LONGLENS_DECODE=eager).", "",
             "| context | prefill tok/s, 1 process | prefill tok/s, " + f"{ranks} ranks | ratio | decode ms/token, 1 process"
             f" | decode ms/token, {ranks} ranks | ratio |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(one["runs"], many["runs"]):
        if a.get("status") != "ok" or b.get("status") != "ok":
            lines.append(f"| {a['context']:,} | {a.get('status')} | {b.get('status')} | | | | |")
            continue
        lines.append(f"| {a['context']:,} | {a['prefill_tok_s']:,.0f} | {b['prefill_tok_s']:,.0f} | "
                     f"{b['prefill_tok_s'] / a['prefill_tok_s']:.2f}x | {a['decode_ms_median']:.1f} | "
                     f"{b['decode_ms_median']:.1f} | {b['decode_ms_median'] / a['decode_ms_median']:.2f}x |")
    return "\n".join(lines)


def write_md(path: Path, command: str, text: str) -> None:
    md = path.read_text()
    section = (f"{BEGIN}\n## Two gloo ranks against one process on this CPU (issue 21)\n\n`{command}`\n\n{text}\n\n"
               "On one CPU splitting costs: the replicated parts (indexer, compressors, mHC, gate, shared expert) run "
               "on both ranks, each rank has one thread where the single process has two, and every layer adds "
               "all-reduces over loopback sockets; ranks pay off when each has its own GPU or machine.\n"
               f"{END}")
    if BEGIN in md:
        md = md[: md.index(BEGIN)] + section + md[md.index(END) + len(END):]
    else:
        md = md.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "assets" / "model"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--contexts", default="4096,32768")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--write-md", help="BENCHMARKS.md to update")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        one = bench(args.model, args.contexts, 1, args.ranks, args.decode_tokens, Path(tmp, "one.json"))
        many = bench(args.model, args.contexts, args.ranks, 1, args.decode_tokens, Path(tmp, "many.json"))
    text = table(one, many, args.ranks, args.ranks)
    print(text)
    if args.write_md:
        command = "python bench/ranks.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_md(Path(args.write_md), command, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
