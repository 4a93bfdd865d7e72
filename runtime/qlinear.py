"""Linears whose weights stay FP8 / FP4 in memory: every matmul dequantises the weight on the fly.

`FP8Linear` holds `weight` (float8_e4m3fn [out, in]) and `scale` ([ceil(out/b0), ceil(in/b1)]);
`FP4Linear` holds `weight` (int8 [out, in/2], two e2m1 codes a byte, low nibble first) and `scale`
([out, in/32]). Scales are float8_e8m0fnu or float32, whichever the checkpoint holds (load with
`load_state_dict(..., assign=True)`). The names mirror the official tensors (`...wq_b.weight`,
`...wq_b.scale`); the formats are runtime/quant.py's.

`forward(x)` equals `F.linear(x, W.to(x.dtype))`, W the exact float32 dequantisation, bit for bit, on
either implementation (`impl`, set model-wide with `set_quant_impl`):
- "reference": runtime.quant.dequantize_fp8/fp4 to float32, cast, F.linear. The parity oracle.
- "fast": the same weight tensor built with fewer, vectorised passes: one 4-byte gather per pair of
  elements from a 256-entry (FP4: byte -> two codes) or 65536-entry (FP8: two bytes -> two values)
  table of bfloat16 pairs, then the block scales applied through a broadcast view. Each element is
  still the reference's float32(value) * float32(scale), rounded to float32 and then to the activation
  dtype: a bf16 table holds every e4m3/e2m1 value exactly, and torch multiplies bf16 by bf16 in float32
  and rounds the product to bf16, so with e8m0 scales (all exact in bf16) a bf16 multiply rounds the
  same product the same way. float32 scales that bf16 does not hold take the float32 route, then the cast.
The weight is dequantised whole for each call, never in tiles of output rows: F.linear over row
tiles is not bit-identical to one call on this CPU, for several tokens (fp32 and bf16, M = 17 ... 2048)
and even for one (fp32: 1 to 256-row tiles disagreed for some widths), so tiles would break the contract.

On CUDA "fast" runs the same torch ops (gathers, casts, broadcast multiplies), which keeps the
contract above; there is no Triton or scaled_mm kernel. That branch is unverified here (no GPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quant import FP4_LUT, dequantize_fp4, dequantize_fp8, quantize_fp4, quantize_fp8

IMPLS = ("reference", "fast")
SCALE_DTYPES = (torch.float8_e8m0fnu, torch.float32)
FP4_STORAGE = (torch.int8, torch.uint8, torch.float4_e2m1fn_x2)  # same bytes; kept as int8
FP4_BLOCK = 32

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(kind: str, device: torch.device) -> torch.Tensor:
    """Gather tables as int32 [n] (a bf16 pair each) or int16 [256] (one bf16), built once per device."""
    key = (kind, device)
    if key not in _TABLES:
        if kind == "fp4":  # byte b -> (LUT[b & 15], LUT[b >> 4]): element 2j is the low nibble
            b = torch.arange(256)
            t = torch.stack([FP4_LUT[b & 15], FP4_LUT[b >> 4]], -1).bfloat16().view(torch.int32)
        elif kind == "fp8x2":  # two consecutive bytes, read as one int16 (either endianness), -> two values
            t = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8)
            t = t.view(torch.float8_e4m3fn).bfloat16().view(torch.int32)
        else:  # "fp8": one byte -> one value (odd input widths)
            t = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
            t = t.bfloat16().view(torch.int16)
        _TABLES[key] = t.reshape(-1).to(device)
    return _TABLES[key]


def _gather_bf16(codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[codes] for integer codes [R, C], as bfloat16 [R, C * (table item bytes / 2)]."""
    if codes.dtype == torch.int16 and codes.is_cpu:
        idx = codes.view(torch.uint16).int()  # one pass; torch's uint16 support is thin, so CPU only
    else:
        idx = codes.int()
        if codes.dtype == torch.int16:
            idx.bitwise_and_(0xFFFF)  # two bytes -> unsigned index
    return table.index_select(0, idx.view(-1)).view(torch.bfloat16).view(codes.shape[0], -1)


def _scaled(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """values [R, C] (bfloat16, exact) times scale[r // b0, c // b1], rounded once to dtype.

    Bit-identical to (values.float() * expanded scale).to(dtype)."""
    s32 = scale.float()
    # bf16 holds every e8m0 value (2^-127 ... 2^127, NaN); float32 scales only if checked
    if dtype == torch.bfloat16 and (scale.dtype == torch.float8_e8m0fnu or torch.equal(s32.bfloat16().float(), s32)):
        w, s = values, s32.bfloat16()  # bf16 * bf16 = float32 product rounded to bf16: the same rounding
    else:
        w, s = values.float(), s32
    _mul_blocks_(w, s, block)
    return w if w.dtype == dtype else w.to(dtype)


def _mul_blocks_(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> None:
    """w[r, c] *= s[r // b0, c // b1] in place, over broadcast views; ragged edge blocks separately."""
    (R, C), (b0, b1) = w.shape, block
    fr, fc = R // b0, C // b1
    rows = [(slice(0, fr * b0), slice(0, fr), fr)] if fr else []
    cols = [(slice(0, fc * b1), slice(0, fc), fc)] if fc else []
    if R % b0:
        rows.append((slice(fr * b0, R), slice(fr, fr + 1), 1))
    if C % b1:
        cols.append((slice(fc * b1, C), slice(fc, fc + 1), 1))
    for wr, sr, nr in rows:
        for wc, sc, nc in cols:
            part = w[wr, wc].unflatten(0, (nr, -1)).unflatten(2, (nc, -1))  # [nr, b0, nc, b1]
            part.mul_(s[sr, sc][:, None, :, None])


def dequantize_fp8_as(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                      block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """dequantize_fp8(w, scale, block).to(dtype), bit for bit, in fewer passes."""
    if w.shape[1] % 2 == 0:
        values = _gather_bf16(w.view(torch.int16), _table("fp8x2", w.device))
    else:
        values = _gather_bf16(w.view(torch.uint8), _table("fp8", w.device))
    return _scaled(values, scale, block, dtype)


def dequantize_fp4_as(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_fp4(w, scale).to(dtype), bit for bit, in fewer passes."""
    values = _gather_bf16(w.view(torch.uint8), _table("fp4", w.device))  # [out, in]
    return _scaled(values, scale, (1, FP4_BLOCK), dtype)


class _QuantLinear(nn.Module):
    """What FP8Linear and FP4Linear share: the impl switch, forward, state-dict checks."""

    WEIGHT_DTYPES: tuple[torch.dtype, ...] = ()

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.impl = "fast"

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] in dtype: the exact dequantisation, cast (rounded once)."""
        if self.impl == "reference":
            return self._reference().to(dtype)
        if self.impl != "fast":
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        return self._fast(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        w, s = state_dict.get(prefix + "weight"), state_dict.get(prefix + "scale")
        if w is not None and w.dtype not in self.WEIGHT_DTYPES:
            error_msgs.append(f"{prefix}weight: {w.dtype}, expected one of {self.WEIGHT_DTYPES}")
        if s is not None and s.dtype not in SCALE_DTYPES:
            error_msgs.append(f"{prefix}scale: {s.dtype}, expected one of {SCALE_DTYPES}")
        if w is not None and w.dtype in (torch.uint8, torch.float4_e2m1fn_x2):
            state_dict[prefix + "weight"] = w.view(torch.int8)  # FP4 bytes: one storage dtype in memory
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scale={self.scale.dtype}, impl={self.impl}")


class FP8Linear(_QuantLinear):
    """y = x W^T, W stored as e4m3 with one power-of-two scale per b0 x b1 block (ragged edges)."""

    WEIGHT_DTYPES = (torch.float8_e4m3fn,)

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = (128, 128),
                 scale_dtype: torch.dtype = torch.float8_e8m0fnu):
        super().__init__(in_features, out_features)
        self.block = tuple(block)
        b0, b1 = self.block
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("scale", torch.empty(math.ceil(out_features / b0), math.ceil(in_features / b1),
                                                  dtype=scale_dtype))

    def _reference(self) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.scale, self.block)

    def _fast(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8_as(self.weight, self.scale, dtype, self.block)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block={self.block}"


class FP4Linear(_QuantLinear):
    """y = x W^T, W stored as packed e2m1 pairs with one power-of-two scale per 1 x 32 block."""

    WEIGHT_DTYPES = FP4_STORAGE

    def __init__(self, in_features: int, out_features: int, scale_dtype: torch.dtype = torch.float8_e8m0fnu):
        if in_features % FP4_BLOCK:
            raise ValueError(f"FP4 needs in_features ({in_features}) to be a multiple of {FP4_BLOCK}")
        super().__init__(in_features, out_features)
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, in_features // FP4_BLOCK, dtype=scale_dtype))

    def _reference(self) -> torch.Tensor:
        return dequantize_fp4(self.weight, self.scale, FP4_BLOCK)

    def _fast(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp4_as(self.weight, self.scale, dtype)


def set_quant_impl(model: nn.Module, impl: str) -> int:
    """Set `impl` on every FP8Linear / FP4Linear under model; returns how many."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, _QuantLinear):
            m.impl, n = impl, n + 1
    return n


def quantize_linear(linear: nn.Linear, kind: str, block: int | tuple[int, int] = (128, 128)) -> FP8Linear | FP4Linear:
    """An FP8Linear / FP4Linear holding runtime.quant's quantisation of linear.weight (no bias)."""
    if linear.bias is not None:
        raise ValueError("quantised linears have no bias")
    out, inp = linear.weight.shape
    w = linear.weight.detach().float().cpu()  # runtime.quant works on the CPU
    if kind == "fp8":
        b0, b1 = (block, block) if isinstance(block, int) else block
        if b0 != b1:
            raise ValueError(f"runtime.quant.quantize_fp8 takes square blocks, got {block}")
        q, s = quantize_fp8(w, b0)
        with torch.device("meta"):
            mod = FP8Linear(inp, out, (b0, b1))
    elif kind == "fp4":
        q, s = quantize_fp4(w, FP4_BLOCK)
        with torch.device("meta"):
            mod = FP4Linear(inp, out)
    else:
        raise ValueError(f"kind must be 'fp8' or 'fp4', got {kind!r}")
    mod.load_state_dict({"weight": q, "scale": s}, assign=True)
    return mod.to(linear.weight.device)
