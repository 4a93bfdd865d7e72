"""Read a DeepSeek-V4 checkpoint folder into a state dict with the official tensor names.

`read_config(folder)` reads config.json. `load_state_dict(folder, expected, dtype)` reads
model.safetensors, a sharded set listed by model.safetensors.index.json, or else every *.safetensors,
one tensor at a time (dequantise/convert, then drop the raw tensor), so the weights are never held twice.

Accepted spellings, all mapped to the official names (`layers.3.attn.wq_a.weight`):
  (a) official DeepSeek names;
  (b) transformers module names (`model.layers.3.self_attn.q_a_proj.weight`, `lm_head.weight`,
      fused `mlp.experts.gate_up_proj [E, 2I, D]` / `down_proj [E, D, I]`);
  (c) what transformers 5.24 `save_pretrained` writes: official names under `model.`, except
      `model.embed_tokens.weight`, `model.hc_head.hc_{fn,base,scale}`, and `attn.norm.weight` for kv_norm.
`mtp.*` (multi-token prediction) tensors are skipped. FP8 weights (e4m3 + `.scale` or `.weight_scale_inv`,
128x128 blocks or config's weight_block_size) and FP4 routed experts (int8 or float4_e2m1fn_x2 + 1x32
scales) are dequantised exactly (see runtime/quant.py).

dtypes: floating tensors come back in `dtype`, except the ones the model keeps in float32 (as transformers
does): hc_*_fn/base/scale, hc_head_*, attn_sink, ape and gate.bias. Integer tensors (gate.tid2eid) keep
their checkpoint dtype. Every tensor is checked against `expected` (name, shape, float-vs-integer kind);
any mismatch, missing or unexpected tensor or unreadable file raises CheckpointError naming tensor and file.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.quant import dequantize_fp4, dequantize_fp8


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names the tensor and the file."""


# transformers name -> official name, applied in order after stripping "model.". Official names contain
# none of these patterns, so they pass through unchanged.
_RENAMES = [(re.compile(p), r) for p, r in [
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    # transformers nests the indexer inside the compressor; officially it sits beside it
    (r"\.self_attn\.compressor\.indexer\.scorer\.", ".attn.indexer."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.sinks$", ".attn_sink"),
    (r"\.position_bias$", ".ape"),
    (r"compressor\.kv_norm\.", "compressor.norm."),
    (r"\.attn\.norm\.", ".attn.kv_norm."),  # save_pretrained undoes kv_norm -> norm one level too far
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.weight_scale_inv$", ".scale"),
]]
_FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
KEEP_FP32 = re.compile(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$|\.attn_sink$|\.ape$|\.gate\.bias$")
_QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8, torch.uint8, torch.float4_e2m1fn_x2)


def canonical_name(name: str) -> str:
    name = name.removeprefix("model.")
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name


def read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config.json is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e!r})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f.name}: listed in {index.name} but missing from {folder}")
        return files
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    return files


def _plan(handles: dict[Path, object]) -> tuple[dict, dict]:
    """From headers only: canonical name -> (file, raw name); and canonical scale name -> (file, raw name)."""
    tensors, scales = {}, {}
    for path, f in handles.items():
        for raw in f.keys():
            name = canonical_name(raw)
            if name.startswith("mtp."):
                continue
            if fused := _FUSED.search(name):
                # one fused transformers tensor stands for E per-expert official tensors
                base, n_exp = name[: fused.start()] + ".experts", f.get_slice(raw).get_shape()[0]
                parts = ("w1", "w3") if fused[1] == "gate_up_proj" else ("w2",)
                names = [f"{base}.{e}.{w}.weight" for e in range(n_exp) for w in parts]
            else:
                names = [name]
            table = scales if name.endswith(".scale") else tensors
            for n in names:
                if n in table:
                    raise CheckpointError(f"{n}: found twice ({table[n][1]} in {table[n][0].name}, {raw} in {path.name})")
                table[n] = (path, raw)
    return tensors, scales


def _kind(dtype: torch.dtype) -> str:
    return "floating" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer/bool"


def quantized_weights(folder) -> dict[str, str]:
    """From headers alone: official name -> "fp8" or "fp4" for every weight stored quantised with a scale."""
    folder = Path(folder)
    with ExitStack() as stack:
        handles = _open(folder, stack)
        tensors, scales = _plan(handles)
        kinds = {}
        for name, (path, raw) in tensors.items():
            if name.removesuffix(".weight") + ".scale" not in scales:
                continue
            dt = handles[path].get_slice(raw).get_dtype()
            kinds[name] = "fp8" if dt.startswith("F8") else "fp4"
        return kinds


def _open(folder: Path, stack: ExitStack) -> dict:
    handles = {}
    for path in _shard_files(folder):
        try:
            handles[path] = stack.enter_context(safe_open(path, framework="pt"))
        except Exception as e:
            raise CheckpointError(f"{path.name}: not a readable safetensors file ({e})") from None
    return handles


def _scale_window(name: str, cut: tuple[int, int, int], dtype: torch.dtype, block: tuple[int, int],
                  full: int) -> tuple[int, int, int]:
    """(dim, start, stop) of the scales under weight slice `cut` = (dim, a, b) of an axis `full` long."""
    dim, a, b = cut
    if dtype == torch.float8_e4m3fn:
        step = block[dim]
    elif dim == 0:  # FP4: a scale per row and per 32 elements of it
        step = 1
    else:  # FP4 columns are packed bytes, two elements each
        a, b, full, step = 2 * a, 2 * b, 2 * full, 32
    if a % step or (b % step and b != full):
        raise CheckpointError(f"{name}: this rank's slice [{a}, {b}) of axis {dim} does not fall on the "
                              f"{step}-element quantisation blocks; choose a world size whose slices do")
    return dim, a // step, -(-b // step)


def load_state_dict(folder, expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
                    dtype: torch.dtype, slices=None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Each tensor goes to `device` as soon as it is read and converted, so host memory holds one at a time.
    `slices(name)` (runtime.parallel.slice_of, bound to a config and shard): None = whole tensor,
    (dim, start, stop) = read only that slice, False = another rank's tensor, skipped. A quantised weight
    whose `.scale` is in `expected` is kept as stored (FP8 e4m3 / FP4 packed int8, with its scale);
    otherwise it is dequantised into `dtype`."""
    folder = Path(folder)
    config = read_config(folder) if (folder / "config.json").exists() else {}
    block = tuple((config.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    slices = slices or (lambda name: None)
    with ExitStack() as stack:
        handles = _open(folder, stack)
        tensors, scales = _plan(handles)
        tensors = {n: v for n, v in tensors.items() if slices(n) is not False}
        scales = {n: v for n, v in scales.items() if slices(n) is not False}

        # Name checks come first, from headers alone, so a wrong checkpoint fails before any data is read.
        unexpected = sorted(set(tensors) - set(expected))
        unexpected += sorted(s for s in scales if s.removesuffix(".scale") + ".weight" not in tensors)
        if unexpected:
            source = {**tensors, **scales}
            listing = ", ".join(f"{n} (stored as {source[n][1]} in {source[n][0].name})" for n in unexpected[:10])
            raise CheckpointError(f"{len(unexpected)} unexpected tensor(s) in {folder}: {listing}")
        missing = sorted(set(expected) - set(tensors) - set(scales))
        if missing:
            more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
            raise CheckpointError(f"{len(missing)} tensor(s) missing from {folder}: {', '.join(missing[:10])}{more}")

        def read(path: Path, raw: str, index=None) -> torch.Tensor:
            """The tensor, or only `index` (a tuple of slices / an int) of it: a rank reads just its part."""
            try:
                if index is None:
                    return handles[path].get_tensor(raw)
                return handles[path].get_slice(raw)[index]
            except Exception as e:
                raise CheckpointError(f"{raw}: cannot read from {path.name} ({e})") from None

        def window(cut, shape) -> tuple:
            dim, a, b = cut
            return tuple(slice(None) if i != dim else slice(a, b) for i in range(len(shape)))

        out: dict[str, torch.Tensor] = {}
        for name, (path, raw) in tensors.items():  # header order: file by file
            cut = slices(name)
            shape = handles[path].get_slice(raw).get_shape()  # as stored (header only)
            if fused := _FUSED.search(canonical_name(raw)):
                # one fused transformers tensor [E, ...] stands for E expert tensors: read expert e's part
                e, w = int(name.split(".")[-3]), name.split(".")[-2]
                half = shape[1] // 2
                rows = slice(None) if w == "w2" else slice(0, half) if w == "w1" else slice(half, 2 * half)
                t = read(path, raw, (e, rows))
            else:
                t = read(path, raw, None if cut is None else window(cut, shape))
            scale_name = name.removesuffix(".weight") + ".scale"
            where = f"in {path.name}"
            if scale_name in scales:
                spath, sraw = scales[scale_name]
                kept = scale_name in expected  # kept quantised: as stored, checked, not converted
                scut = None
                if cut is not None:
                    try:
                        scut = _scale_window(name, cut, t.dtype, block, shape[cut[0]])
                    except CheckpointError:
                        if kept:
                            raise
                        # dequantised anyway: read the whole weight, dequantise, then cut this rank's slice
                        t = read(path, raw)
                sshape = handles[spath].get_slice(sraw).get_shape()
                scale = read(spath, sraw, None if scut is None else window(scut, sshape))
                if kept:
                    _check_quantized(name, t, scale, block, where)
                    out[name] = _check(name, t if t.dtype == torch.float8_e4m3fn else t.view(torch.int8),
                                       expected, where).contiguous().to(device)
                    out[scale_name] = _check(scale_name, scale, expected, where).contiguous().to(device)
                    continue
                t = _dequantize(name, t, scale, block, where)
                if cut is not None and scut is None:
                    t = t[window(cut, t.shape)]
            elif t.dtype in (torch.float8_e4m3fn, torch.float4_e2m1fn_x2):
                raise CheckpointError(f"{name}: quantised {t.dtype} weight without a scale {where}")
            t = _check(name, t, expected, where)
            if t.is_floating_point():  # rebinding t drops the raw tensor: one copy at a time
                t = t.to(torch.float32 if KEEP_FP32.search(name) else dtype)
            out[name] = t.contiguous().to(device)
        return out


def _check(name: str, t: torch.Tensor, expected: dict, where: str) -> torch.Tensor:
    shape, want = expected[name]
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{name}: expected shape {tuple(shape)}, checkpoint has {tuple(t.shape)} {where}")
    if _kind(t.dtype) != _kind(want):
        raise CheckpointError(f"{name}: expected {want} ({_kind(want)}), checkpoint has {t.dtype} {where}")
    return t


def _check_quantized(name, w, scale, block, where) -> None:
    if w.dtype not in _QUANT_DTYPES or not scale.is_floating_point() or w.dim() != 2:
        raise CheckpointError(f"{name}: {w.dtype} {tuple(w.shape)} weight with {scale.dtype} scale {where}: not FP8/FP4")
    fp8, (out, inp) = w.dtype == torch.float8_e4m3fn, w.shape
    want = (-(-out // block[0]), -(-inp // block[1])) if fp8 else (out, 2 * inp // 32)
    if tuple(scale.shape) != want:
        raise CheckpointError(f"{name}: scale shape {tuple(scale.shape)} for weight {tuple(w.shape)} "
                              f"{w.dtype}, expected {want} {where}")


def _dequantize(name: str, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], where: str) -> torch.Tensor:
    # FP8: ceil for the ragged edge blocks; FP4: two elements per byte, one scale per 32 logical elements
    _check_quantized(name, w, scale, block, where)
    fp8 = w.dtype == torch.float8_e4m3fn
    return dequantize_fp8(w, scale, block) if fp8 else dequantize_fp4(w, scale, 32)
