"""A few DeepSeek-V4-Flash layers at their real shapes, in the official checkpoint format, run on the CPU.

    python bench/flash_layers.py --out /tmp/flash [--layers 2] [--experts 256] [--tokens 4096] [--decode 8]
                                 [--threads 2] [--dtype bfloat16|float32] [--chunk 2048] [--json FILE]

`write_checkpoint(folder, layers, experts, seed)` writes what the released Flash checkpoint holds for its
first layers (names, dtypes and shapes of /work/shared/spec/deepseek_v4.md §5.1): FP8 e4m3 with e8m0 128x128
block scales for the attention linears, the indexer's wq_b and the shared expert; routed experts as MXFP4
(int8 [out, in/2], two e2m1 codes a byte, e8m0 1x32 scales); bf16 embed / head / norms / gate / compressors /
weights_proj; fp32 mHC, attn_sink, ape and gate.bias; int64 tid2eid. The weights are random codes drawn
directly in the stored formats (a float copy of 256 experts would be 25 GB), with power-of-two scales that
give each matrix a std near fan_in^-0.5. One safetensors file per layer plus one for embed / head / final
norm / hyper-head, listed by model.safetensors.index.json; each file is built, saved and freed in turn.

The CLI then loads it with the weights kept quantised, compares resident bytes with file bytes, prefills
random ids and decodes greedily on the fast path, and replays the same ids with every quantised linear on
the "reference" implementation (exact dequantisation, then F.linear): the logits must be bit-equal. Exit
status 1 when they are not, or when resident bytes pass 1.2x the file bytes (float32 activations do: the
bf16 embedding and head are widened, 1.23x at 2 layers). On the CPU the kept weights are views of the
mmapped files (safetensors hands them over without a copy), so RSS grows as pages are first touched.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import machine_info, proc_status, reset_peak_rss  # noqa: E402
from runtime.generate import decode_one_token, prefill  # noqa: E402
from runtime.model import load_model  # noqa: E402
from runtime.qlinear import set_quant_impl  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "runtime" / "presets" / "flash.json"
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128],
         "activation_scheme": "dynamic"}
# What the spec lists, for a checkout without the preset (runtime/presets/flash.json holds the same).
FLASH = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
         "hidden_size": 4096, "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512,
         "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128,
         "compress_rope_theta": 160000, "rope_theta": 10000,
         "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                          "beta_fast": 32, "beta_slow": 1},
         "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
         "n_routed_experts": 256, "num_experts_per_tok": 6, "n_shared_experts": 1, "moe_intermediate_size": 2048,
         "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
         "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hc_mult": 4, "hc_sinkhorn_iters": 20,
         "hc_eps": 1e-06, "rms_norm_eps": 1e-06, "bos_token_id": 0, "eos_token_id": 1,
         "tie_word_embeddings": False, "torch_dtype": "bfloat16", "quantization_config": QUANT}


def flash_config(layers: int = 2, experts: int = 256, vocab: int | None = None) -> dict:
    """Flash's config.json cut to `layers` layers: CSA and HCA alternate from layer 0 (Flash's own pattern
    after its two sliding layers), the first ceil(layers / 2) layers (at most Flash's 3) are hash-routed."""
    cfg = json.loads(PRESET.read_text()) if PRESET.exists() else dict(FLASH)
    cfg.update(num_hidden_layers=layers, n_routed_experts=experts, num_nextn_predict_layers=0,
               compress_ratios=[(4, 128)[i % 2] for i in range(layers)], num_hash_layers=min(3, -(-layers // 2)),
               quantization_config=dict(QUANT), expert_dtype="fp4")
    if vocab is not None:
        cfg["vocab_size"] = vocab
    if cfg["num_experts_per_tok"] > experts:
        raise ValueError(f"{experts} experts: need at least num_experts_per_tok={cfg['num_experts_per_tok']}")
    return cfg


# ------------------------------------------------------------------------------------------ random codes
# FP8: sign, exponent field 5..8 (|v| in [0.25, 3.75]), any mantissa: never NaN (0x7F / 0xFF need field 15)
_E4M3_BYTES = torch.tensor([s << 7 | e << 3 | m for s in (0, 1) for e in range(5, 9) for m in range(8)],
                           dtype=torch.uint8)
_E4M3_RMS = _E4M3_BYTES.view(torch.float8_e4m3fn).float().pow(2).mean().sqrt().item()
# FP4: every byte is two valid e2m1 codes; uniform bytes give uniform codes, rms sqrt(8.5625)
_E2M1_RMS = math.sqrt(8.5625)
_SCALE_SPREAD = math.sqrt((0.25 + 1 + 4) / 3)  # rms of 2^k, k uniform in {-1, 0, 1}: one exponent per block


def _scales(shape, code_rms: float, fan_in: int, g: torch.Generator) -> torch.Tensor:
    """e8m0 scales 2^(base + k), k uniform in {-1, 0, 1}, base putting the weight std near fan_in^-0.5."""
    base = round(math.log2(fan_in ** -0.5 / (code_rms * _SCALE_SPREAD)))
    return torch.randint(126 + base, 129 + base, shape, dtype=torch.uint8, generator=g).view(torch.float8_e8m0fnu)


def fp8_weight(out: int, inp: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [out, in], e8m0 [ceil(out/128), ceil(in/128)])."""
    pick = torch.randint(0, len(_E4M3_BYTES), (out, inp), dtype=torch.uint8, generator=g)
    # the table lookup without an int64 index: bits of pick -> sign | exponent | mantissa, as the table orders them
    codes = ((pick & 32) << 2) | (((pick >> 3) & 3) + 5) << 3 | (pick & 7)
    return codes.view(torch.float8_e4m3fn), _scales((-(-out // 128), -(-inp // 128)), _E4M3_RMS, inp, g)


def fp4_weight(out: int, inp: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in/2] packed e2m1 pairs, e8m0 [out, in/32]); `inp` is the logical input width."""
    packed = torch.randint(-128, 128, (out, inp // 2), dtype=torch.int8, generator=g)
    return packed, _scales((out, inp // 32), _E2M1_RMS, inp, g)


def _normal(shape, std: float, dtype: torch.dtype, g: torch.Generator, rows: int = 8192) -> torch.Tensor:
    """randn * std in dtype, drawn a block of rows at a time (no float32 copy of a vocab-sized matrix)."""
    t = torch.empty(shape, dtype=dtype)
    flat = t.view(-1, shape[-1]) if len(shape) > 1 else t.view(1, -1)
    for r in range(0, flat.shape[0], rows):
        n = min(rows, flat.shape[0] - r)
        flat[r:r + n] = (torch.randn(n, flat.shape[1], generator=g) * std).to(dtype)
    return t


def _hc(n: int, D: int, g: torch.Generator, sub: bool = True) -> tuple[torch.Tensor, ...]:
    """mHC fn / base / scale (fp32): small random projections, residual mixing starting at the identity."""
    rows = (2 + n) * n if sub else n
    fn = torch.randn(rows, n * D, generator=g) * 0.005
    base = torch.zeros(rows)
    if sub:
        base[2 * n:] = torch.eye(n).flatten()
    return fn, base, torch.ones(3 if sub else 1)


# ------------------------------------------------------------------------------------------ the files
def layer_tensors(cfg: dict, i: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Layer i's official tensors, in the order of the spec's table."""
    D, H, d, n = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"], cfg["hc_mult"]
    qr, G, orank, inter = cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"], cfg["moe_intermediate_size"]
    E, bf, p = cfg["n_routed_experts"], torch.bfloat16, f"layers.{i}."
    t: dict[str, torch.Tensor] = {}

    def fp8(name, out, inp):
        t[name + ".weight"], t[name + ".scale"] = fp8_weight(out, inp, g)

    def compressor(prefix, dim, rate, overlap):
        c = 2 if overlap else 1
        t[prefix + "wkv.weight"] = _normal((c * dim, D), D ** -0.5, bf, g)
        t[prefix + "wgate.weight"] = _normal((c * dim, D), D ** -0.5, bf, g)
        t[prefix + "ape"] = torch.randn(rate, c * dim, generator=g) * 0.1
        t[prefix + "norm.weight"] = torch.ones(dim, dtype=bf)

    for site in ("attn", "ffn"):
        t[p + f"hc_{site}_fn"], t[p + f"hc_{site}_base"], t[p + f"hc_{site}_scale"] = _hc(n, D, g)
    t[p + "attn_norm.weight"] = torch.ones(D, dtype=bf)
    t[p + "ffn_norm.weight"] = torch.ones(D, dtype=bf)
    t[p + "attn.attn_sink"] = torch.randn(H, generator=g) * 0.5
    fp8(p + "attn.wq_a", qr, D)
    t[p + "attn.q_norm.weight"] = torch.ones(qr, dtype=bf)
    fp8(p + "attn.wq_b", H * d, qr)
    fp8(p + "attn.wkv", d, D)
    t[p + "attn.kv_norm.weight"] = torch.ones(d, dtype=bf)
    fp8(p + "attn.wo_a", G * orank, H * d // G)
    fp8(p + "attn.wo_b", D, G * orank)
    rate = cfg["compress_ratios"][i]
    if rate:
        compressor(p + "attn.compressor.", d, rate, rate == 4)
    if rate == 4:  # CSA: the lightning indexer
        hi, di = cfg["index_n_heads"], cfg["index_head_dim"]
        fp8(p + "attn.indexer.wq_b", hi * di, qr)
        t[p + "attn.indexer.weights_proj.weight"] = _normal((hi, D), D ** -0.5, bf, g)
        compressor(p + "attn.indexer.compressor.", di, rate, True)
    t[p + "ffn.gate.weight"] = _normal((E, D), D ** -0.5, bf, g)
    if i < cfg["num_hash_layers"]:  # each token id -> k distinct experts
        ranks = torch.rand(cfg["vocab_size"], E, generator=g)
        t[p + "ffn.gate.tid2eid"] = ranks.topk(cfg["num_experts_per_tok"], dim=-1).indices  # int64
        del ranks
    else:
        t[p + "ffn.gate.bias"] = torch.randn(E, generator=g) * 0.01
    for e in range(E):
        for w, (out, inp) in (("w1", (inter, D)), ("w2", (D, inter)), ("w3", (inter, D))):
            q = p + f"ffn.experts.{e}.{w}"
            t[q + ".weight"], t[q + ".scale"] = fp4_weight(out, inp, g)
    for w, (out, inp) in (("w1", (inter, D)), ("w2", (D, inter)), ("w3", (inter, D))):
        fp8(p + f"ffn.shared_experts.{w}", out, inp)
    return t


def outer_tensors(cfg: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    """embed, head, final norm and the hyper-head."""
    V, D, n = cfg["vocab_size"], cfg["hidden_size"], cfg["hc_mult"]
    fn, base, scale = _hc(n, D, g, sub=False)
    return {"embed.weight": _normal((V, D), D ** -0.5, torch.bfloat16, g),
            "head.weight": _normal((V, D), D ** -0.5, torch.bfloat16, g),
            "norm.weight": torch.ones(D, dtype=torch.bfloat16),
            "hc_head_fn": fn, "hc_head_base": base, "hc_head_scale": scale}


def write_checkpoint(folder, layers: int = 2, experts: int = 256, seed: int = 0, vocab: int | None = None) -> Path:
    """Write config.json, model-0000k-of-0000n.safetensors (k = 1..layers: layer k-1; the last: embed / head /
    norm / hc_head) and model.safetensors.index.json. Peak memory is about the largest file (one layer:
    3.3 GB with 256 experts). `vocab` overrides the vocabulary size (tests use a small one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = flash_config(layers, experts, vocab)
    n_files, weight_map, total = layers + 1, {}, 0
    for k in range(n_files):
        g = torch.Generator().manual_seed(seed * 1000 + k)  # each file reproducible on its own
        tensors = layer_tensors(cfg, k, g) if k < layers else outer_tensors(cfg, g)
        fname = f"model-{k + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))  # last: its presence marks a whole checkpoint
    return folder


def ensure_checkpoint(folder, layers: int, experts: int, seed: int = 0, vocab: int | None = None) -> bool:
    """Write the checkpoint unless `folder` already holds one of this shape; True if written."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        have = json.loads(cfg_path.read_text())
        if (have.get("num_hidden_layers"), have.get("n_routed_experts")) == (layers, experts) and \
                (vocab is None or have.get("vocab_size") == vocab):
            return False
        cfg_path.unlink()
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
    write_checkpoint(folder, layers, experts, seed, vocab)
    return True


# ------------------------------------------------------------------------------------------ the run
def file_bytes(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def random_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def resident_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class Stopwatch:
    """start() ... stop() -> seconds: CUDA events on a GPU (waits for the end event), perf_counter elsewhere."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.begin
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self.begin.elapsed_time(end) / 1e3


@torch.no_grad()
def run_ids(model, ids: list[int], decode: int, chunk: int, forced: list[int] | None = None) -> dict:
    """Prefill `ids` in chunks, then `decode` steps (greedy, or feeding `forced` tokens): timings, the cache,
    and the stacked logits [decode + 1, vocab] (after the prompt, then after each decoded token)."""
    cache, clock = model.new_cache(), Stopwatch(model.device)
    clock.start()
    logits = [prefill(model, ids, cache, chunk_size=chunk)]
    prefill_s = clock.stop()
    tokens, steps = [], []
    for j in range(decode):
        tok = int(logits[-1].argmax()) if forced is None else forced[j]
        tokens.append(tok)
        clock.start()
        logits.append(decode_one_token(model, tok, cache))
        steps.append(clock.stop())
    return {"logits": torch.stack(logits).float().cpu(), "tokens": tokens, "prefill_s": prefill_s,
            "decode_s": steps, "cache": cache}


def measure(folder, tokens: int, decode: int, chunk: int, dtype: torch.dtype, device: str = "cpu",
            seed: int = 0, reference: bool = True) -> tuple[dict, torch.Tensor]:
    """Load (weights kept quantised), bytes, fast prefill + decode, then the reference replay: the record,
    and the fast path's logits [decode + 1, vocab]."""
    t = time.perf_counter()
    # the eager step: the comparison is of the quantised matmuls, not of runtime/compiled.py's step
    model = load_model(folder, device=device, dtype=dtype, quantized="keep", decode="eager")
    load_s = time.perf_counter() - t
    fbytes, rbytes = file_bytes(folder), resident_bytes(model)
    cfg = model.config
    ids = random_ids(cfg.vocab_size, tokens, seed)
    fast = run_ids(model, ids, decode, chunk)
    rec = {"layers": cfg.num_hidden_layers, "layer_types": cfg.layer_types, "mlp_layer_types": cfg.mlp_layer_types,
           "experts": cfg.n_routed_experts, "vocab": cfg.vocab_size, "tokens": tokens, "decode": decode, "chunk": chunk,
           "dtype": str(dtype).removeprefix("torch."), "device": str(device), "load_s": load_s,
           "file_bytes": fbytes, "resident_bytes": rbytes, "resident_over_file": rbytes / fbytes,
           "prefill_s": fast["prefill_s"], "prefill_tok_s": tokens / fast["prefill_s"],
           "decode_ms": [1e3 * s for s in fast["decode_s"]],
           "decode_ms_median": 1e3 * statistics.median(fast["decode_s"]) if decode else None,
           "tokens_out": fast["tokens"], "finite": bool(fast["logits"].isfinite().all())}
    if reference:
        n = set_quant_impl(model, "reference")
        ref = run_ids(model, ids, decode, chunk, forced=fast["tokens"])
        set_quant_impl(model, "fast")
        rec.update(quantised_linears=n, reference_prefill_s=ref["prefill_s"],
                   reference_decode_ms_median=1e3 * statistics.median(ref["decode_s"]) if decode else None,
                   **parity(fast["logits"], ref["logits"]))
    return rec, fast["logits"]


def parity(fast: torch.Tensor, ref: torch.Tensor) -> dict:
    """Bit-equality of two logit stacks, the largest difference, and the logits' scale beside it."""
    return {"logits_equal": torch.equal(fast, ref), "logits_max_abs_diff": (fast - ref).abs().max().item(),
            "logits_scale": fast.abs().max().item()}


def table(rec: dict) -> str:
    gib = 1 / 2 ** 30
    rows = [("machine", f"{rec['cpu_model']} ({rec['threads']} torch threads; load avg at start "
                        f"{rec['loadavg_at_start']})"),
            ("model", f"{rec['layers']} Flash layers {rec['layer_types']} / {rec['mlp_layer_types']}, "
                      f"{rec['experts']} experts, vocab {rec['vocab']}, activations {rec['dtype']}"),
            ("file bytes", f"{rec['file_bytes'] * gib:.3f} GiB"),
            ("resident weight bytes", f"{rec['resident_bytes'] * gib:.3f} GiB ({rec['resident_over_file']:.3f}x file)"),
            ("load", f"{rec['load_s']:.1f} s"),
            ("prefill", f"{rec['tokens']} tokens in {rec['prefill_s']:.1f} s = {rec['prefill_tok_s']:.1f} tok/s "
                        f"(chunks of {rec['chunk']})")]
    if rec["decode"]:
        rows.append(("decode", f"{rec['decode_ms_median']:.0f} ms/token median of {rec['decode']} "
                               f"({1e3 / rec['decode_ms_median']:.2f} tok/s)"))
    if "logits_equal" in rec:
        rows += [("reference replay", f"prefill {rec['reference_prefill_s']:.1f} s, decode "
                                      f"{rec['reference_decode_ms_median'] or 0:.0f} ms/token "
                                      f"({rec['quantised_linears']} quantised linears on 'reference')"),
                 ("fast == reference logits", f"{rec['logits_equal']} (max abs diff {rec['logits_max_abs_diff']:.3g}, "
                                              f"logits up to {rec['logits_scale']:.3g})")]
    rows.append(("peak RSS", f"{rec['peak_rss_bytes'] * gib:.2f} GiB (ru_maxrss of the run, after the writer)"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{w}} | {v} |" for k, v in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="checkpoint folder (written if it holds none of this shape)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=None, help="override Flash's 129,280 (smaller: quicker checks)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens per forward)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true", help="skip the reference replay")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    wrote = ensure_checkpoint(args.out, args.layers, args.experts, args.seed, args.vocab)
    write_s = time.perf_counter() - t
    reset_peak_rss()  # the peak below is the run's, not the writer's (where the kernel allows)
    rec = {**machine_info("cpu"), "threads": args.threads, "wrote_checkpoint": wrote,
           "write_s": write_s if wrote else None}
    rec.update(measure(args.out, args.tokens, args.decode, args.chunk, getattr(torch, args.dtype), seed=args.seed,
                       reference=not args.no_reference)[0])
    status = proc_status()
    rec["peak_rss_bytes"] = status.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    rec["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(table(rec))
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=2))
    return 0 if rec.get("logits_equal", True) and rec["resident_over_file"] <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
