"""Flash-shaped layers on one GPU: prefill and decode speed, quantised matmuls against the reference, and
decode's share of the memory-bandwidth limit. The prepared device check; one JSON and a table.

    torchrun --nproc-per-node 1 bench/gpu_flash.py --out /tmp/flash --layers 2 --experts 256
    python bench/gpu_flash.py --device cpu --out /tmp/flash-smoke --experts 8 --tokens 256   (CPU smoke)

Under torchrun the process joins an NCCL group of world size 1 (gloo on the CPU) before loading, so the
model loads and runs as one rank of a distributed run would. Steps:
1. write the checkpoint with bench/flash_layers.write_checkpoint unless `--out` holds one of this shape;
2. load it with the weights kept FP8 / FP4 (bfloat16 elsewhere); resident and device bytes;
3. for each `--tokens` length: a one-shot prefill from an empty cache, then `--decode` greedy steps
   (CUDA events around each); the first length is replayed with every quantised linear on "reference"
   (dequantise exactly, then F.linear) and the logits compared bit for bit;
4. each quantised linear shape of a Flash layer (attention, indexer, shared and routed expert) on random
   activations of `--matmul-tokens` rows: fast vs the reference implementation, and vs F.linear over the
   weight dequantised on the CPU by runtime.quant (an oracle that does not depend on the reference running
   on the device: quant.dequantize_fp4 indexes a CPU table); max abs / rel differences and times;
5. bytes a decode step reads (the weights it touches: attention and indexer, the 6 routed experts it picks
   and the shared one, the gate, norms, mHC, one embedding row, the head; plus the cache it reads: window,
   indexer keys, the CSA entries it gathers, every HCA entry) over the measured step time, as a share of
   a large device-to-device copy's bandwidth and of the card's specified HBM bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.flash_layers import (Stopwatch, ensure_checkpoint, file_bytes, parity, random_ids,  # noqa: E402
                                resident_bytes, run_ids)
from bench.machine import copy_bandwidth, machine_info  # noqa: E402
from runtime import parallel  # noqa: E402
from runtime.model import load_model  # noqa: E402
from runtime.qlinear import FP8Linear, set_quant_impl  # noqa: E402
from runtime.quant import dequantize_fp4, dequantize_fp8  # noqa: E402

# Specified HBM bandwidth, bytes/s, by a substring of torch.cuda.get_device_name (first match wins).
SPEC_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12)]
# The quantised linears of a Flash CSA layer, by module path in layer 0 (routed experts: expert "0").
LINEARS = ["attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b", "attn.indexer.wq_b",
           "ffn.shared_experts.w1", "ffn.shared_experts.w2", "ffn.experts.0.w1", "ffn.experts.0.w2"]


def join_group(device: str) -> tuple[str | None, torch.device]:
    """Under torchrun, a process group of world size 1 (NCCL on CUDA, gloo on the CPU): the backend and this
    rank's device. runtime.parallel.init_from_env starts a group only for world sizes above 1."""
    if "WORLD_SIZE" not in os.environ:
        return None, torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                  "cpu" if device == "auto" else device)
    if int(os.environ["WORLD_SIZE"]) != 1:
        raise SystemExit("bench/gpu_flash.py measures one GPU: run it with --nproc-per-node 1")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}" if device in ("auto", "cuda") and torch.cuda.is_available() else device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    probe = torch.ones(1, device=dev)
    dist.all_reduce(probe)  # the collective path works (a no-op sum over one rank)
    assert parallel.current().world == 1 and probe.item() == 1.0
    return backend, dev


def spec_bandwidth(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((bw for key, bw in SPEC_BANDWIDTH if key in name), None)


# ------------------------------------------------------------------------------------------ bytes per step
def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def decode_weight_bytes(model) -> dict[str, int]:
    """Weight bytes one decode step reads, by part: every weight except the routed experts it does not pick
    (k of E per layer, counted as k x one expert's bytes), the embedding (one row) and the hash table (one row)."""
    cfg, parts = model.config, dict.fromkeys(("attention", "routed", "shared", "gate", "head", "other"), 0)
    k = cfg.num_experts_per_tok
    for name, t in model.state_dict().items():
        if ".ffn.experts." in name:
            if ".ffn.experts.0." in name:  # one expert's tensors, k times
                parts["routed"] += k * _bytes(t)
        elif name == "embed.weight":
            parts["other"] += t.shape[1] * t.element_size()
        elif name.endswith("gate.tid2eid"):
            parts["gate"] += t.shape[1] * t.element_size()
        elif ".ffn.gate." in name:
            parts["gate"] += _bytes(t)
        elif ".attn." in name:
            parts["attention"] += _bytes(t)
        elif ".shared_experts." in name:
            parts["shared"] += _bytes(t)
        elif name == "head.weight":
            parts["head"] += _bytes(t)
        else:
            parts["other"] += _bytes(t)
    return parts


def decode_cache_bytes(model, cache) -> int:
    """Cache bytes a decode step reads: windows, buffers, indexer keys and HCA entries whole, and the
    (at most index_topk) CSA entries the indexer picks."""
    nb, cfg = cache.nbytes(), model.config
    read = nb["window"] + nb["buffers"] + nb["indexer_keys"] + nb["hca_entries"]
    for lc in cache.layers:
        if lc.index is not None and lc.kv.count:
            entries = lc.kv.entries.view()  # [B, N, d]
            read += entries.shape[0] * min(cfg.index_topk, entries.shape[1]) * entries.shape[2] * entries.element_size()
    return read


# ------------------------------------------------------------------------------------------ matmuls
def _best_ms(clock: Stopwatch, reps: int, fn, *args) -> float | None:
    """The fastest of `reps` timed calls fn(*args), in ms (None for no reps)."""
    if reps < 1:
        return None
    times = []
    for _ in range(reps):
        clock.start()
        fn(*args)
        times.append(clock.stop())
    return 1e3 * min(times)


def cpu_dequantized(mod, dtype: torch.dtype) -> torch.Tensor:
    """The module's exact dequantisation computed on the CPU by runtime.quant, cast, on the module's device:
    the oracle whatever runtime.quant does on the device (its FP4 table lives on the CPU)."""
    w, s = mod.weight.cpu(), mod.scale.cpu()
    full = dequantize_fp8(w, s, mod.block) if isinstance(mod, FP8Linear) else dequantize_fp4(w, s)
    return full.to(mod.weight.device, dtype)


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.float() - b.float()).abs().max()
    return {"equal": torch.equal(a, b), "max_abs": d.item(), "max_rel": (d / b.float().abs().max().clamp(min=1e-30)).item()}


@torch.no_grad()
def matmul_check(model, rows: list[int], reps: int = 3) -> list[dict]:
    """Layer 0's quantised linears on random bf16 activations: the fast implementation against the reference
    one and against F.linear over the CPU-dequantised weight (`oracle_*`); differences and times. An impl
    that raises is recorded (`reference_error`), not fatal."""
    out, clock, g = [], Stopwatch(model.device), torch.Generator().manual_seed(1)
    layer = model.layers[0]
    for path in LINEARS:
        try:
            mod = layer.get_submodule(path)
        except AttributeError:  # no indexer in an HCA-only cut
            continue
        oracle_w = cpu_dequantized(mod, model.dtype)
        for m in rows:
            x = torch.randn(m, mod.in_features, generator=g).to(model.device, model.dtype)
            rec = {"linear": path, "kind": type(mod).__name__, "shape": [mod.out_features, mod.in_features], "rows": m}
            mod.impl = "fast"
            fast = mod(x)  # warm-up and the value compared
            rec["fast_ms"] = _best_ms(clock, reps, mod, x)
            rec.update({f"oracle_{k}": v for k, v in _diff(fast, F.linear(x, oracle_w)).items()})
            rec["dense_bf16_ms"] = _best_ms(clock, reps, F.linear, x, oracle_w)  # the matmul alone, weight in bf16
            mod.impl = "reference"
            try:
                rec.update(_diff(fast, mod(x)), reference_ms=_best_ms(clock, reps, mod, x))
            except RuntimeError as e:
                rec.update(equal=None, max_abs=None, max_rel=None, reference_ms=None, reference_error=str(e)[:300])
            mod.impl = "fast"
            out.append(rec)
            del x, fast
        del oracle_w
    return out


# ------------------------------------------------------------------------------------------ the run
def run(args) -> dict:
    backend, dev = join_group(args.device)
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    wrote = ensure_checkpoint(args.out, args.layers, args.experts, args.seed, args.vocab)
    rec = {**machine_info(str(dev)), "process_group": backend, "world_size": parallel.current().world,
           "wrote_checkpoint": wrote, "write_s": time.perf_counter() - t if wrote else None}
    gpu_name, spec_bw = spec_bandwidth(dev)
    t = time.perf_counter()
    model = load_model(args.out, device=dev, dtype=torch.bfloat16, quantized="keep")
    cfg = model.config
    rec.update(gpu_name=gpu_name, layers=cfg.num_hidden_layers, layer_types=cfg.layer_types,
               mlp_layer_types=cfg.mlp_layer_types, experts=cfg.n_routed_experts, vocab=cfg.vocab_size,
               load_s=time.perf_counter() - t, file_bytes=file_bytes(args.out), resident_bytes=resident_bytes(model))
    rec["resident_over_file"] = rec["resident_bytes"] / rec["file_bytes"]
    if dev.type == "cuda":
        rec["cuda_allocated_after_load"] = torch.cuda.memory_allocated(dev)

    warm = 256 if dev.type == "cuda" else 16  # tables, kernels, cuBLAS handles; little to warm on the CPU
    run_ids(model, random_ids(cfg.vocab_size, warm, args.seed + 1), 1, warm)
    copy_bw = copy_bandwidth(str(dev), nbytes=(2 << 30) if dev.type == "cuda" else (256 << 20))
    weights = decode_weight_bytes(model)
    rec.update(copy_bandwidth_bytes_s=copy_bw, spec_bandwidth_bytes_s=spec_bw, decode_weight_bytes=weights,
               runs=[])
    for i, n in enumerate(args.tokens):
        ids = random_ids(cfg.vocab_size, n, args.seed)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        fast = run_ids(model, ids, args.decode, n)  # one-shot prefill, as the official generate.py does
        step = statistics.median(fast["decode_s"]) if args.decode else None
        moved = sum(weights.values()) + decode_cache_bytes(model, fast["cache"])
        r = {"tokens": n, "prefill_s": fast["prefill_s"], "prefill_tok_s": n / fast["prefill_s"],
             "decode_ms": [1e3 * s for s in fast["decode_s"]], "decode_ms_median": step and 1e3 * step,
             "decode_tok_s": step and 1 / step, "decode_bytes_per_token": moved,
             "decode_bytes_s": step and moved / step,
             "decode_share_of_copy_bw": step and moved / step / copy_bw,
             "decode_share_of_spec_bw": step and spec_bw and moved / step / spec_bw,
             "cache_bytes": fast["cache"].nbytes()["total"], "finite": bool(fast["logits"].isfinite().all())}
        if dev.type == "cuda":
            r["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(dev)
        del fast["cache"]
        if i == 0 and not args.no_reference:
            set_quant_impl(model, "reference")
            try:
                ref = run_ids(model, ids, args.decode, n, forced=fast["tokens"])
                r.update(reference_prefill_s=ref["prefill_s"], **parity(fast["logits"], ref["logits"]))
                del ref
            except RuntimeError as e:  # recorded: the matmul table still compares against the CPU oracle
                r.update(logits_equal=False, reference_error=str(e)[:300])
            set_quant_impl(model, "fast")
        rec["runs"].append(r)
    rows = args.matmul_tokens or ([1, 128, 4096] if dev.type == "cuda" else [1, 3])
    rec["matmuls"] = matmul_check(model, rows, reps=args.reps)
    if backend is not None:
        dist.destroy_process_group()
    return rec


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(rec: dict) -> str:
    gib, lines = 1 / 2 ** 30, []
    lines.append(f"{rec['gpu_name'] if rec['device'] != 'cpu' else rec['cpu_model']} | torch {rec['torch']} | "
                 f"group {rec['process_group']} x{rec['world_size']} | {rec['layers']} Flash layers "
                 f"{rec['mlp_layer_types']}, {rec['experts']} experts, bf16")
    lines.append(f"weights: file {rec['file_bytes'] * gib:.2f} GiB, resident {rec['resident_bytes'] * gib:.2f} GiB "
                 f"({rec['resident_over_file']:.3f}x); copy bandwidth {rec['copy_bandwidth_bytes_s'] / 1e9:.0f} GB/s"
                 + (f", spec {rec['spec_bandwidth_bytes_s'] / 1e12:.2f} TB/s" if rec["spec_bandwidth_bytes_s"] else ""))
    lines.append("| tokens | prefill tok/s | decode ms/token | decode tok/s | MB read/token | share of copy BW "
                 "| share of spec BW | fast == reference logits |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rec["runs"]:
        spec = f"{r['decode_share_of_spec_bw']:.1%}" if r["decode_share_of_spec_bw"] else "-"
        eq = "error (see JSON)" if "reference_error" in r else \
            f"{r['logits_equal']} (max diff {r['logits_max_abs_diff']:.2g})" if "logits_equal" in r else "-"
        dec = (f"{r['decode_ms_median']:.1f} | {r['decode_tok_s']:.1f} | {r['decode_bytes_per_token'] / 1e6:.0f} | "
               f"{r['decode_share_of_copy_bw']:.1%} | {spec}") if r["decode_ms_median"] else "- | - | - | - | -"
        lines.append(f"| {r['tokens']} | {r['prefill_tok_s']:.0f} | {dec} | {eq} |")
    lines.append("| linear | kind | [out, in] | rows | fast ms | reference ms | dense bf16 ms | fast == reference "
                 "| fast == CPU-dequantised oracle (max abs, rel) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for m in rec["matmuls"]:
        ref = "error (see JSON)" if m.get("reference_error") else f"{m['equal']} ({m['max_abs']:.2g})"
        lines.append(f"| {m['linear']} | {m['kind']} | {m['shape']} | {m['rows']} | {_ms(m['fast_ms'])} | "
                     f"{_ms(m['reference_ms'])} | {_ms(m['dense_bf16_ms'])} | {ref} | {m['oracle_equal']} "
                     f"({m['oracle_max_abs']:.2g}, {m['oracle_max_rel']:.2g}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/flash", help="checkpoint folder (written if it holds none of this shape)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=None, help="override Flash's 129,280")
    ap.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384],
                    help="prefill lengths, comma-separated (each from an empty cache, one forward)")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--matmul-tokens", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="activation rows per matmul check (default 1,128,4096 on a GPU, 1,3 on the CPU)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per matmul (0: compare only)")
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
    ap.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true", help="skip the reference replay of the first length")
    ap.add_argument("--json", default=None, help="results file (default: OUT/gpu_flash.json)")
    args = ap.parse_args(argv)
    rec = run(args)
    print(table(rec))
    path = Path(args.json or Path(args.out) / "gpu_flash.json")
    path.write_text(json.dumps(rec, indent=2))
    print(f"wrote {path}")
    ok = all(r.get("logits_equal", True) and r["finite"] for r in rec["runs"]) and \
        all(m["oracle_equal"] and m["equal"] is not False for m in rec["matmuls"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
