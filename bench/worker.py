"""One context length in its own process: `python -m bench.worker SPEC.json OUT.json`.

The parent (bench.cli) writes the spec; this process sets its address-space limit first (so an
overrun raises an allocation error instead of waking the OOM killer), builds or loads the model,
and writes one JSON result. Peak RSS (VmHWM) is therefore this length's alone.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback

from .machine import _peak_mem, _sync, matmul_peak, proc_status, torch_dtype

SPLIT_STEPS = 16  # hooked decode steps for the time split, after the timed ones

def set_memory_guard(limit_bytes: int | None, device: str) -> int | None:
    """RLIMIT_AS = limit (CPU only: CUDA reserves far more address space than it uses)."""
    if not limit_bytes or device.startswith("cuda"):
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit_bytes = min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, hard))
    return limit_bytes


def build_model(spec: dict):
    """(model, config dict, source description) from spec["model_dir"] or spec["preset"]."""
    import torch

    import runtime
    from runtime.config import ModelConfig
    from runtime.model import Transformer

    device, dtype = spec["device"], torch_dtype(spec["dtype"])
    if spec.get("model_dir"):
        from runtime.checkpoint import read_config
        model = runtime.load_model(spec["model_dir"], device=device, dtype=dtype,
                                   prefill_dtype=spec.get("prefill_dtype", "auto"))
        return model, read_config(spec["model_dir"]), f"checkpoint {spec['model_dir']}"
    cfg = ModelConfig.from_dict(spec["config"])
    model = Transformer(cfg).init_weights(spec.get("seed", 0))
    if dtype != torch.float32:
        for name, p in model.named_parameters():
            if not _keeps_fp32(name):
                p.data = p.data.to(dtype)
    from runtime.isa import resolve_prefill

    model.set_prefill_dtype(resolve_prefill(spec.get("prefill_dtype", "auto"), device, dtype))  # as load_model
    return model.to(device).eval(), spec["config"], f"preset {spec.get('preset')} (random weights, seed {spec.get('seed', 0)})"


def _keeps_fp32(name: str) -> bool:
    """The loader's rule for tensors kept in fp32 whatever the dtype (mHC, sinks, ape, gate bias)."""
    try:
        from runtime.checkpoint import KEEP_FP32
        return bool(KEEP_FP32.search(name))
    except ImportError:
        leaf = name.rsplit(".", 1)[-1]
        return leaf.startswith("hc_") or leaf in ("attn_sink", "ape", "bias")


def cache_bytes(cache) -> dict:
    nb = cache.nbytes()
    cap = 0
    for lc in cache.layers:  # allocated capacity of the append-only entry buffers (<= 2x stored)
        for st in (lc.kv, lc.index):
            data = getattr(getattr(st, "entries", None), "data", None)
            if data is not None:
                cap += data.numel() * data.element_size()
    return {"components": nb, "dense_equivalent": cache.dense_nbytes(), "entries_capacity": cap,
            "length": cache.length}


def _profile_table(prof, rows: int = 15, device_time: bool = False) -> dict:
    """Top ops by self time: CPU time on CPU, device (kernel) time when profiling CUDA."""
    evs = prof.key_averages()
    key = (lambda e: getattr(e, "self_device_time_total", 0)) if device_time else (lambda e: e.self_cpu_time_total)
    tot = sum(key(e) for e in evs) or 1
    top = sorted(evs, key=key, reverse=True)[:rows]
    return {"total_self_cpu_ms": tot / 1e3, "clock": "device" if device_time else "cpu",
            "top": [{"op": e.key, "calls": e.count, "self_ms": key(e) / 1e3, "share": key(e) / tot} for e in top]}


def measure_runtime(spec: dict) -> dict:
    import torch

    from runtime.generate import decode_one_token, prefill
    from runtime.isa import resolve as resolve_index_dtype
    from runtime.timing import LayerTimer

    from . import flops as F

    device = spec["device"]
    L, chunk, D = spec["context"], spec["chunk"], spec["decode_tokens"]
    res: dict = {"kind": "runtime", "context": L}
    t0 = time.perf_counter()
    model, cfg_dict, source = build_model(spec)
    c = model.config
    res.update(model_source=source, build_seconds=time.perf_counter() - t0,
               params=model.num_params(), active_params=model.num_params(active=True),
               layer_types=list(c.layer_types))
    # the model's position limit: prefill less if the decode steps would run past it
    P = min(L, c.max_position_embeddings - D - SPLIT_STEPS)
    res["prefill_tokens"] = P
    gen = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
    ids = torch.randint(0, c.vocab_size, (P,), generator=gen).tolist()
    budget = getattr(model.layers[0].attn, "score_budget", 256 << 20)

    split = spec.get("split", True)
    timer = None
    gc.collect()
    res["rss_before_prefill"] = proc_status().get("VmRSS")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = []
    cache = logits = None
    repeats = spec["repeats"]
    ref_ctx = spec.get("decode_ref_context") or 0
    ref_ctx = ref_ctx if ref_ctx < P and ref_ctx + repeats * D <= c.max_position_embeddings else 0
    ref_ids = torch.randint(0, c.vocab_size, (ref_ctx,), generator=gen).tolist() if ref_ctx else None
    ref_cache, ref_steps = None, []
    index_dtype = resolve_index_dtype(spec.get("index_dtype", "auto"), device)  # the parent's choice, by name
    new_cache = lambda: model.new_cache(index_dtype=index_dtype)
    with torch.inference_mode():
        for r in range(repeats):
            cache = logits = None
            gc.collect()
            cache = new_cache()
            timer = LayerTimer(model, device) if split else None
            chunk_times, tick = [], []

            def on_chunk(done, total):
                _sync(device)
                chunk_times.append(time.perf_counter() - tick[-1])
                tick.append(time.perf_counter())

            _sync(device)
            tp = time.perf_counter()
            tick.append(tp)
            # the engine's own prefill: entry buffers sized once, the chunk's unused pages returned
            logits = prefill(model, ids, cache, chunk_size=chunk, reserve_tokens=P + D + SPLIT_STEPS, on_chunk=on_chunk)
            prefill_s = time.perf_counter() - tp
            if r == 0:  # the prefill's own peak (the 1M target is about prefill), before any decode
                res["memory_after_prefill"] = _peak_mem(device)
            split_p = timer.snapshot(prefill_s) if timer else None
            if timer:  # decode is timed without the hooks: their constant cost would shrink every ratio
                timer.close()
                timer = None
            cb = cache_bytes(cache)
            # decode D tokens (greedy) after the prefill; with a reference cache, its steps alternate with
            # these, so decode(L) / decode(ref) is measured under the same load (see decode_ref_context)
            if ref_ctx and ref_cache is None:
                ref_cache = new_cache()
                ref_tok = int(prefill(model, ref_ids, ref_cache, chunk_size=chunk).argmax())
            tok = int(logits.argmax())
            steps = []
            for _ in range(D):  # greedy decode, the engine's step (runtime/generate.py)
                ts = time.perf_counter()
                tok = int(decode_one_token(model, tok, cache).argmax())
                _sync(device)
                steps.append(time.perf_counter() - ts)
                if ref_cache is not None:
                    ts = time.perf_counter()
                    ref_tok = int(decode_one_token(model, ref_tok, ref_cache).argmax())
                    _sync(device)
                    ref_steps.append(time.perf_counter() - ts)
            split_d = None
            if split:  # the split from SPLIT_STEPS more steps, hooked (per step: the split's own wall time)
                timer = LayerTimer(model, device)
                _sync(device)
                ts = time.perf_counter()
                for _ in range(SPLIT_STEPS):
                    tok = int(decode_one_token(model, tok, cache).argmax())
                _sync(device)
                split_d = {k: v / SPLIT_STEPS for k, v in timer.snapshot(time.perf_counter() - ts).items()}
                timer.close()
                timer = None
            runs.append({"prefill_s": prefill_s, "chunk_s": chunk_times, "decode_step_s": steps,
                         "split_prefill_s": split_p, "split_decode_s_per_token": split_d, "cache": cb})
    res["memory"] = _peak_mem(device)
    res["cache_after_prefill"] = runs[0]["cache"]
    res["cache_after_decode"] = cache_bytes(cache)

    pre = sorted(r["prefill_s"] for r in runs)
    all_steps = [s for r in runs for s in r["decode_step_s"]]
    res["prefill_s_runs"] = [r["prefill_s"] for r in runs]
    res["prefill_s"] = statistics.median(pre)
    res["prefill_tok_s"] = P / res["prefill_s"]
    res["chunk_s_first_run"] = runs[0]["chunk_s"]
    res["decode_ms_median"] = 1e3 * statistics.median(all_steps)
    res["decode_ms_p10_p90"] = [1e3 * q for q in _quantiles(all_steps, (0.1, 0.9))]
    res["decode_steps"] = len(all_steps)
    if ref_steps:
        res["decode_ref_context"] = ref_ctx
        res["decode_ref_ms_median"] = 1e3 * statistics.median(ref_steps)
        res["decode_ratio_vs_ref"] = res["decode_ms_median"] / res["decode_ref_ms_median"]
    if split:
        res["split_decode_steps"] = SPLIT_STEPS
        res["split_prefill_s"] = _median_dicts([r["split_prefill_s"] for r in runs])
        res["split_decode_ms"] = {k: 1e3 * v for k, v in _median_dicts(
            [r["split_decode_s_per_token"] for r in runs]).items()}

    fp = F.prefill_flops(c, P, chunk, keep=1, score_budget=budget)
    fd = F.decode_flops(c, P, D, score_budget=budget)
    res["flops_prefill"] = fp
    res["flops_decode_per_token"] = fd
    res["prefill_flop_s"] = F.total(fp["performed"]) / res["prefill_s"]
    res["decode_flop_s"] = F.total(fd["performed"]) / (res["decode_ms_median"] / 1e3)
    res["decode_bytes_per_token"] = F.decode_bytes(c, P, model.dtype.itemsize,
                                                   None if index_dtype is None else index_dtype.itemsize)
    res["decode_bytes_s"] = res["decode_bytes_per_token"] / (res["decode_ms_median"] / 1e3)

    # the worker's own matmul check (contention drift), after the peak-RSS reading it would pollute
    res["matmul_peak_worker"] = matmul_peak(model.dtype, device, n=spec.get("peak_n", 2048), reps=3)
    if spec.get("profile"):
        res["profile"] = profile_runs(model, cache, spec, c)
    return res


def profile_runs(model, cache, spec, c) -> dict:
    """torch.profiler over one more prefill chunk and 16 decode steps at the reached depth."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from runtime.generate import decode_one_token, prefill

    device = spec["device"]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    chunk = spec["chunk"]
    out = {"depth": cache.length}
    room = c.max_position_embeddings - cache.length
    gen = torch.Generator().manual_seed(12345)
    with torch.inference_mode():
        if room >= chunk + 16:
            ids = torch.randint(0, c.vocab_size, (chunk,), generator=gen).tolist()
            with profile(activities=acts) as prof:
                logits = prefill(model, ids, cache, chunk_size=chunk, trim=False)
                _sync(device)
            out["prefill_chunk"] = _profile_table(prof, device_time=device.startswith("cuda"))
            out["prefill_chunk"]["tokens"] = chunk
            tok = int(logits.argmax())
            with profile(activities=acts) as prof:
                for _ in range(16):
                    tok = int(decode_one_token(model, tok, cache).argmax())
                _sync(device)
            out["decode_16"] = _profile_table(prof, device_time=device.startswith("cuda"))
        else:
            out["skipped"] = "no positions left under max_position_embeddings"
    return out


def _quantiles(xs, qs):
    s = sorted(xs)
    return [s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] for q in qs]


def _median_dicts(ds: list[dict]) -> dict:
    return {k: statistics.median(d[k] for d in ds) for k in ds[0]}


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    limit = set_memory_guard(spec.get("mem_limit_bytes"), spec["device"])
    res, code = run(spec)
    res["mem_limit_bytes"] = limit
    with open(out_path, "w") as f:
        json.dump(res, f)
    return code


def run(spec: dict) -> tuple[dict, int]:
    """One spec measured in this process: (result, exit code). Under torchrun every rank calls this with the
    same spec, in step: the model calls inside are collective."""
    import torch

    torch.set_num_threads(spec["threads"])
    status, code = "ok", 0
    try:
        if spec.get("kind") == "compare":
            from .compare import measure_compare
            res = measure_compare(spec)
        else:
            res = measure_runtime(spec)
    except Exception as e:  # noqa: BLE001 -- reported, never swallowed
        msg = f"{type(e).__name__}: {e}"
        oom = isinstance(e, MemoryError) or "allocate" in str(e).lower() or "out of memory" in str(e).lower()
        status, code = ("memory-guard" if oom else "error"), (3 if oom else 1)
        res = {"kind": spec.get("kind", "runtime"), "context": spec["context"], "error": msg,
               "traceback": traceback.format_exc()[-4000:], "memory": {"rss": proc_status()}}
    res.update(status=status, pid=os.getpid(), threads=torch.get_num_threads())
    return res, code


if __name__ == "__main__":
    sys.exit(main())
