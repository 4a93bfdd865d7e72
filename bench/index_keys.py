"""The indexer keys' dtype, measured: CSA selections with bf16 keys against fp32 keys, and decode time per layout.

    python bench/index_keys.py overlap [--context 131072] [--queries 256] [--decode 32] [--json PATH]
    python bench/index_keys.py decode [--context 1048576] [--steps 48] [--keys bfloat16,float32] [--no-mkldnn]

`overlap`: the shipped model prefills --context tokens of the held-out haystack text (runtime/haystacks.py)
with fp32 indexer keys; the cache is copied with its keys rounded to bf16 (what a bf16 cache stores), and both
caches then take the same next tokens: --queries of them as one prefill chunk, then --decode one at a time
(the decode path). Per query it compares the CSA top-k sets, and for every pick that differs, how far the
fp32 reference score of the bf16-only pick lies below the k-th reference score (a near tie, or not).

`decode`: time per decode step (runtime/generate.py's decode_one_token, the engine's step) at --context
tokens, one cache per key dtype, steps alternating with a 4,096-token cache, plus the indexer's scoring alone
over the keys (bf16, fp32 and fp16). The long cache is synthetic -- random state of the right shapes (one
CSA layer of the shipped model holds context/4 = 262,144 keys at 1M) -- because only the step's time is
measured. Run it under ATEN_CPU_CAPABILITY=avx2 (and --no-mkldnn, which keeps bf16 matmuls off oneDNN as
on a CPU without AVX-512) to emulate, in part, a CPU without native bf16: oneDNN / MKL can still pick their
own kernels unless ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS cap them too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import print_json  # noqa: E402
from runtime import isa  # noqa: E402
from runtime.cache import Cache  # noqa: E402
from runtime.config import CSA, HCA  # noqa: E402
from runtime.generate import decode_one_token, prefill  # noqa: E402
from runtime.introspect import Capture  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "assets" / "model"


def load():
    from runtime.model import load_model
    from runtime.tokenizer import Tokenizer

    return load_model(MODEL).eval(), Tokenizer.from_file(MODEL / "tokenizer.json")


def machine() -> dict:
    cpu = isa.detect()
    return {"cpu": cpu.model, "isa": cpu.tier, "torch_capability": cpu.capability, "threads": torch.get_num_threads(),
            "mkldnn": torch.backends.mkldnn.enabled, "torch": torch.__version__,
            "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
                    if k in os.environ}}


# ------------------------------------------------------------------------------------------------ overlap
def _recording(model, store: list):
    """Wrap each CSA indexer's scores() to keep its fp32 output (the reference scores of every entry)."""
    for block in model.layers:
        ind = block.attn.indexer
        if ind is not None:
            plain = type(ind).scores.__get__(ind)
            ind.scores = lambda q, w, k, plain=plain: store.append(plain(q, w, k)) or store[-1]


def _copy(cache: Cache, index_dtype) -> Cache:
    return Cache.from_state(cache.config, cache.state(), cache.length, cache.entry_counts(), cache.batch_size,
                            index_dtype, reserve_tokens=4096)


def overlap(args) -> dict:
    from runtime.tasks import TokenPool

    model, tok = load()
    cfg = model.config
    n = args.context + args.decode
    pool = TokenPool.corpus("heldout", int(n * 3.6) + 500_000, tok)
    ids = pool.ids[:n].tolist()
    if len(ids) < n:
        raise SystemExit(f"the held-out pool has {len(ids):,} tokens, fewer than {n:,}")
    body = args.context - args.queries
    t0 = time.perf_counter()
    with torch.inference_mode():
        ref = model.new_cache(index_dtype=torch.float32)
        prefill(model, ids[:body], ref, chunk_size=4096, reserve_tokens=n)
        prefill_s = time.perf_counter() - t0
        half = _copy(ref, torch.bfloat16)
        runs = {}
        for name, cache in (("float32", ref), ("bfloat16", half)):
            scores, cap, logits = [], Capture(), []
            if name == "float32":
                _recording(model, scores)
            # the last --queries tokens as one chunk (the prefill path), then --decode steps (the decode path)
            logits.append(model(torch.tensor([ids[body:args.context]]), cache, capture=cap)[0].float())
            for t in ids[args.context:n]:
                logits.append(decode_one_token(model, t, cache, cap)[None].float())
            runs[name] = (cap, torch.cat(logits), scores)
            for block in model.layers:  # back to the class's scores()
                if block.attn.indexer is not None:
                    block.attn.indexer.__dict__.pop("scores", None)
    k = cfg.index_topk
    out = {"kind": "overlap", "machine": machine(), "model": str(MODEL.relative_to(ROOT)), "context": args.context,
           "queries_prefill": args.queries, "queries_decode": args.decode, "index_topk": k, "text": pool.name,
           "prefill_s": prefill_s, "layers": {}}
    lf, lb = runs["float32"][1], runs["bfloat16"][1]
    out["logits_max_rel_err"] = float((lf - lb).abs().max() / lf.abs().max())
    out["argmax_agree"] = f"{int((lf.argmax(-1) == lb.argmax(-1)).sum())} of {lf.shape[0]}"
    for layer in (i for i, t in enumerate(cfg.layer_types) if t == CSA):
        rf, rb = runs["float32"][0].record(layer), runs["bfloat16"][0].record(layer)
        rows = [r for s in runs["float32"][2] for r in s.reshape(-1, s.shape[-1])]  # reference scores per query
        q = args.queries
        out["layers"][str(layer)] = {part: _compare(rf.selected[0, a:b], rb.selected[0, a:b], rows[a:b])
                                     for part, a, b in (("all", 0, q + args.decode), ("prefill chunk", 0, q),
                                                        ("decode", q, q + args.decode))}
    return out


def _compare(sel_ref, sel, ref_scores) -> dict:
    """Top-k sets per query [Q, K] against the reference's; each pick only the other makes, scored by the
    reference: how far below the reference's k-th score (relative), and whether it ties it exactly."""
    same = diff = exact = identical = 0
    gaps = []
    for a, b, row in zip(sel_ref.tolist(), sel.tolist(), ref_scores):
        a, b = set(a) - {-1}, set(b) - {-1}
        same, identical = same + len(a & b), identical + (a == b)
        kth = float(row[list(a)].min())
        for e in b - a:
            diff += 1
            exact += float(row[e]) == kth
            gaps.append((kth - float(row[e])) / abs(kth) if kth else float("inf"))
    return {"queries": len(ref_scores), "queries_identical": identical, "picks": same + diff, "same": same,
            "overlap": same / max(1, same + diff), "differing_picks": diff, "exact_ties": exact,
            "gap_below_kth_rel_max": max(gaps, default=0.0),
            "gap_below_kth_rel_median": statistics.median(gaps) if gaps else 0.0}


# ------------------------------------------------------------------------------------------------ decode
def synthetic(model, length: int, index_dtype) -> Cache:
    """A cache at `length` tokens from random state of the right shapes (timing only: the values are noise)."""
    cfg, g = model.config, torch.Generator().manual_seed(0)
    t, counts = {}, {}
    for i, kind in enumerate(cfg.layer_types):
        t[f"L{i}.window"] = torch.randn(1, min(length, cfg.sliding_window - 1), cfg.head_dim, generator=g)
        if kind in (CSA, HCA):
            n = length // cfg.rate(i)
            t[f"L{i}.kv.entries"] = torch.randn(1, n, cfg.head_dim, generator=g)
            counts[f"L{i}.kv"] = n
        if kind == CSA:
            t[f"L{i}.index.entries"] = torch.randn(1, n, cfg.index_head_dim, generator=g)
            counts[f"L{i}.index"] = n
    return Cache.from_state(cfg, t, length, counts, 1, index_dtype, reserve_tokens=4096)


def _best_median(fn, reps: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts), 1e3 * statistics.median(ts)


def decode(args) -> dict:
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    model, _ = load()
    cfg = model.config
    keys = [x for x in args.keys.split(",") if x]
    out = {"kind": "decode", "machine": machine(), "context": args.context, "steps": args.steps,
           "cache": "synthetic (random state)", "indexer_keys_per_csa_layer": args.context // cfg.csa_rate}
    with torch.inference_mode():
        # the indexer's scoring alone, one decode query over every key
        ind = next(b.attn.indexer for b in model.layers if b.attn.indexer is not None)
        g = torch.Generator().manual_seed(1)
        q = torch.randn(1, 1, ind.n_heads, ind.head_dim, generator=g)
        w = torch.randn(1, 1, ind.n_heads, generator=g)
        base = torch.randn(1, args.context // cfg.csa_rate, ind.head_dim, generator=g)
        out["scores_ms_best_median"] = {d: _best_median(lambda k=base.to(getattr(torch, d)): ind.scores(q, w, k), 20)
                                        for d in ("bfloat16", "float32", "float16")}
        ref = model.new_cache(index_dtype=torch.float32)
        gen = torch.Generator().manual_seed(2)
        ref_tok = int(prefill(model, torch.randint(0, cfg.vocab_size, (4096,), generator=gen).tolist(), ref,
                              chunk_size=4096).argmax())
        caches = {d: synthetic(model, args.context, getattr(torch, d)) for d in keys}
        toks = {d: 7 for d in keys}
        times = {d: [] for d in keys + ["ref 4096"]}
        for _ in range(args.steps + 4):  # 4 warm-up rounds, then steps alternate: long caches, the 4k cache
            for d in keys:
                t0 = time.perf_counter()
                toks[d] = int(decode_one_token(model, toks[d], caches[d]).argmax())
                times[d].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref_tok = int(decode_one_token(model, ref_tok, ref).argmax())
            times["ref 4096"].append(time.perf_counter() - t0)
    med = {d: 1e3 * statistics.median(v[4:]) for d, v in times.items()}
    out["decode_ms_median"] = med
    out["ratio_vs_4096"] = {d: med[d] / med["ref 4096"] for d in keys}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/index_keys.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("overlap")
    o.add_argument("--context", type=int, default=131072)
    o.add_argument("--queries", type=int, default=256, help="last context tokens fed as one chunk, compared")
    o.add_argument("--decode", type=int, default=32, help="decode steps after the context, compared")
    d = sub.add_parser("decode")
    d.add_argument("--context", type=int, default=1048576)
    d.add_argument("--steps", type=int, default=48)
    d.add_argument("--keys", default="bfloat16,float32")
    d.add_argument("--no-mkldnn", action="store_true", help="torch.backends.mkldnn.enabled = False")
    for x in (o, d):
        x.add_argument("--threads", type=int, default=None)
        x.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = overlap(args) if args.cmd == "overlap" else decode(args)
    print_json(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
