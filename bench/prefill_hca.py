"""Prefill's HCA pass in bf16 against the reference, in one process: time and numerics on the shipped model.

    python bench/prefill_hca.py [--context 262144] [--rounds 2] [--queries 32] [--threads 2] [--json PATH]

The shipped model prefills --context tokens of held-out haystack text (runtime/haystacks.py) in 4,096-token
chunks, once per prefill dtype and round, alternating ("model": the HCA pass in the model's fp32, the
reference; "bfloat16": what `--prefill-dtype auto` picks on a CPU with native bf16, runtime/isa.py). Then
--queries more tokens are decoded one by one on each cache, capturing the CSA picks. Reported: the median
prefill time per dtype and their ratio; the logits' largest and median relative error (per position,
max |a - b| / max |b|) and greedy agreement over the last 256 positions of every chunk; and the overlap of
the CSA picks of the next queries. Needs a CPU with native bf16 to mean much.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import print_json  # noqa: E402
from runtime import isa  # noqa: E402
from runtime.introspect import Capture  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "assets" / "model"
SAMPLE = 256  # positions per 4,096-token chunk whose logits are compared (the chunk's last ones)


def run(args) -> dict:
    import runtime
    from runtime.tasks import TokenPool
    from runtime.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    model = runtime.load_model(MODEL, decode="eager", prefill_dtype="model")
    tok = Tokenizer.from_file(MODEL / "tokenizer.json")
    n, Q = args.context, args.queries
    pool = TokenPool.corpus("heldout", int((n + Q) * 3.6) + 500_000, tok)
    ids = torch.tensor(pool.ids[: n + Q])[None]
    if ids.shape[1] < n + Q:
        raise SystemExit(f"the held-out pool has {ids.shape[1]:,} tokens, fewer than {n + Q:,}")
    times = {"model": [], "bfloat16": []}
    last = {}
    for r in range(args.rounds):
        for name in (("model", "bfloat16") if r % 2 == 0 else ("bfloat16", "model")):
            model.set_prefill_dtype(None if name == "model" else torch.bfloat16)
            cache = model.new_cache(index_dtype=isa.choose("cpu"))
            keep = []
            t0 = time.perf_counter()
            with torch.inference_mode():
                for chunk in ids[:, :n].split(4096, dim=1):
                    logits = model(chunk, cache, logits_to_keep=SAMPLE)  # all of them would be ~8 GB at 256k
                    if r == 0:
                        keep.append(logits[0])  # [SAMPLE, vocab]
                times[name].append(time.perf_counter() - t0)
                if r == 0:  # numerics from the first round: full logits of every position, then the picks
                    picks = []
                    for i in range(n, n + Q):
                        cap = Capture()
                        model(ids[:, i : i + 1], cache, capture=cap)
                        picks.append({k: set(cap.record(k).selected.flatten().tolist()) - {-1} for k in cap.layers
                                      if cap.record(k).selected is not None})
                    last[name] = (keep, picks)
            print(f"round {r + 1}: {name} prefill {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
            del cache
    (ref, ref_picks), (got, got_picks) = last["model"], last["bfloat16"]
    worst, rels, agree, total = 0.0, [], 0, 0
    for a, b in zip(got, ref):  # chunk by chunk: [S, vocab]
        rel = (a - b).abs().amax(-1) / b.abs().amax(-1)
        worst = max(worst, float(rel.max()))
        rels.append(rel)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    same = sum(len(pa[k] & pb[k]) for pa, pb in zip(got_picks, ref_picks) for k in pb)
    count = sum(len(pb[k]) for pb in ref_picks for k in pb)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = isa.detect()
    return {"context": n, "rounds": args.rounds, "threads": args.threads,
            "machine": {"cpu": cpu.model, "isa": cpu.tier, "torch": torch.__version__},
            "prefill_s": times, "prefill_s_median": med, "speedup": med["model"] / med["bfloat16"],
            "logits_max_rel_err": worst, "logits_median_rel_err": float(torch.cat(rels).median()),
            "greedy_agreement": agree / total, "next_queries": Q, "csa_pick_overlap": same / max(1, count)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=262144)
    p.add_argument("--rounds", type=int, default=2, help="prefills per dtype, alternating (the first one also "
                                                         "gives the numerics)")
    p.add_argument("--queries", type=int, default=32, help="next tokens decoded after each prefill, picks compared")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    out = run(args)
    print_json(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
