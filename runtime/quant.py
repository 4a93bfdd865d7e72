"""DeepSeek-V4 storage formats: block-scaled FP8 and FP4 (de)quantisation, and an official-format writer.

FP8 (attention and shared-expert linears): e4m3 weight, one power-of-two scale per 128x128 block
(ragged edge blocks use ceil(dim/128)):       W[o, i] = float(q[o, i]) * S[o // 128, i // 128]
FP4 (routed experts): int8 [out, in/2], byte j holds element 2j in the low nibble and 2j+1 in the high
nibble, nibble -> FP4_LUT, one scale per 1x32 block:  W[o, i] = FP4_LUT[nib(o, i)] * S[o, i // 32]
Scales are float8_e8m0fnu (value 2^(byte-127)) or float32. Dequantisation computes in float32, which
is exact: an e4m3/e2m1 value times a power of two fits bf16 too.

`quantize_*` mirror the official runtime's rounding (power-of-two scale = 2^ceil(log2(amax/max_code))).
`save_official` writes a checkpoint folder in official naming; the tests use it to build checkpoints.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

FP4_LUT = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
_FP4_MIDPOINTS = torch.tensor([.25, .75, 1.25, 1.75, 2.5, 3.5, 5])  # between consecutive |LUT| codes
E4M3_MAX, E2M1_MAX = 448.0, 6.0

# Which official tensors save_official quantises (the same split as the released Flash checkpoint).
FP8_NAMES = re.compile(r"\.attn\.(indexer\.)?(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|\.shared_experts\.w[123]\.weight$")
FP4_NAMES = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")


def _pow2_scale(amax: torch.Tensor, max_code: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= max_code, as float8_e8m0fnu."""
    exp = torch.ceil(torch.log2(amax.float().clamp(min=1e-4) / max_code))
    return (exp + 127).clamp(0, 254).to(torch.uint8).view(torch.float8_e8m0fnu)


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Repeat one scale per block over its elements, cropping the ragged edge."""
    # torch's e8m0 -> float32 cast is exact: byte b becomes 2^(b-127), 255 becomes NaN
    s = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return s[: shape[0], : shape[1]]


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    return w.float() * _expand(scale, tuple(w.shape), block)


def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = w.shape
    rows, cols = math.ceil(out / block), math.ceil(inp / block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32)
    padded[:out, :inp] = w.float()
    amax = padded.view(rows, block, cols, block).abs().amax(dim=(1, 3))
    scale = _pow2_scale(amax, E4M3_MAX)
    q = (w.float() / _expand(scale, (out, inp), (block, block))).clamp(-E4M3_MAX, E4M3_MAX)
    return q.to(torch.float8_e4m3fn), scale


def dequantize_fp4(w: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    b = w.view(torch.uint8).long()  # int8 or float4_e2m1fn_x2 storage: same bytes
    nibbles = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)  # [out, in]: low nibble first
    values = FP4_LUT.to(b.device)[nibbles]  # the table goes where the weight is (CUDA too)
    return values * _expand(scale, tuple(values.shape), (1, block))


def quantize_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = w.shape
    if inp % block:
        raise ValueError(f"FP4 needs the input dim ({inp}) to be a multiple of {block}")
    scale = _pow2_scale(w.float().view(out, inp // block, block).abs().amax(-1), E2M1_MAX)
    x = (w.float() / _expand(scale, (out, inp), (1, block))).clamp(-E2M1_MAX, E2M1_MAX)
    codes = torch.bucketize(x.abs(), _FP4_MIDPOINTS) + 8 * (x < 0)  # round to nearest code, sign in bit 3
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.to(torch.uint8).view(torch.int8), scale


def save_official(state_dict: dict[str, torch.Tensor], folder, config: dict, quantize: bool = False,
                  shards: int = 1, block: int = 128) -> None:
    """Write config.json + safetensors in official naming; FP8/FP4 like the released checkpoint if `quantize`
    (FP8 in `block` x `block` tiles: 128 as released; tiny test models use smaller ones so that a rank's
    slice of a few dozen rows still starts on a block)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if quantize and (FP8_NAMES.search(name) or FP4_NAMES.search(name)):
            q, s = quantize_fp8(t, block) if FP8_NAMES.search(name) else quantize_fp4(t)
            tensors[name], tensors[name.removesuffix(".weight") + ".scale"] = q, s
        else:
            tensors[name] = t.contiguous()
    if quantize:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                         "weight_block_size": [block, block]}
        config["expert_dtype"] = "fp4"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    # Consecutive runs of names per shard; a weight and its scale are adjacent so usually share one.
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * per:(k + 1) * per]}
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
