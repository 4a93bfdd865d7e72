"""runtime/qlinear.py: FP8 / FP4 linears that keep their weights quantised.

The contract under test: forward(x) == F.linear(x, dequantize_*(weight, scale).to(x.dtype)) bit for
bit, on the "reference" and the "fast" implementation alike, for fp32 and bf16 activations, e8m0 and
float32 scales, ragged FP8 blocks, one token and several; plus meta construction, loading,
state-dict names and the packed buffer sizes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.qlinear import (FP4Linear, FP8Linear, dequantize_fp4_as, dequantize_fp8_as, quantize_linear,
                             set_quant_impl)
from runtime.quant import dequantize_fp4, dequantize_fp8, quantize_fp4, quantize_fp8

# (kind, out, in, block): ragged 128-blocks, small square blocks (ragged and whole), FP4 widths
CASES = [("fp8", 200, 300, 128), ("fp8", 10, 14, 4), ("fp8", 12, 16, 4), ("fp8", 9, 7, 4),
         ("fp4", 48, 64, 128), ("fp4", 5, 96, 128)]
IDS = [f"{k}-{o}x{i}-b{b}" for k, o, i, b in CASES]
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(5,), (2, 3), (1,), (1, 1)]  # leading dims of x: 2-D, 3-D, one token 2-D and 3-D


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (so -0 != 0); NaNs must sit in the same places, payloads aside."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a[~nan].view(ints), b[~nan].view(ints))


def make(kind, out, inp, block, scale_dtype=torch.float8_e8m0fnu, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g) * 0.1
    w[0, :3] = 0  # zeros (and their sign) survive both paths
    lin = nn.Linear(inp, out, bias=False)
    lin.weight.data = w
    mod = quantize_linear(lin, kind, block)
    if scale_dtype != mod.scale.dtype:
        mod.scale = mod.scale.to(scale_dtype)
    return mod


def oracle(mod) -> torch.Tensor:
    """The exact float32 weight, straight from runtime.quant."""
    if isinstance(mod, FP8Linear):
        return dequantize_fp8(mod.weight, mod.scale, mod.block)
    return dequantize_fp4(mod.weight, mod.scale, 32)


def inputs(mod, lead, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, mod.in_features, generator=g).to(dtype)


@pytest.mark.parametrize("lead", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_is_a_linear_on_the_dequantised_weight(case, dtype, lead):
    mod = make(*case)
    set_quant_impl(mod, "reference")
    lin = nn.Linear(mod.in_features, mod.out_features, bias=False)
    lin.weight.data = oracle(mod).to(dtype)
    x = inputs(mod, lead, dtype)
    with torch.no_grad():
        assert same_bits(mod(x), lin(x))
    assert same_bits(mod.dequantized(dtype), lin.weight.data)


@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fast_is_bitwise_the_reference(case, dtype, scale_dtype):
    mod = make(*case, scale_dtype=scale_dtype)
    assert mod.scale.dtype == scale_dtype
    for lead in SHAPES:
        x = inputs(mod, lead, dtype)
        set_quant_impl(mod, "reference")
        ref, ref_w = mod(x), mod.dequantized(dtype)
        set_quant_impl(mod, "fast")
        assert same_bits(mod(x), ref), lead
        assert same_bits(mod.dequantized(dtype), ref_w)


def test_float32_scales_that_are_not_powers_of_two():
    """bf16 cannot hold such scales: fast takes the float32 route and still rounds once, like the reference."""
    for case in (("fp8", 200, 300, 128), ("fp4", 48, 64, 128)):
        mod = make(*case, scale_dtype=torch.float32)
        mod.scale = mod.scale * (1 + torch.rand(mod.scale.shape, generator=torch.Generator().manual_seed(2)))
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            assert same_bits(mod.dequantized(dtype), oracle(mod).to(dtype)), (case, dtype)


# e8m0 bytes: the smallest (2^-127, subnormal in fp32), around 1, where bf16 products start to round
# or overflow, the largest (2^127) and NaN (255)
SCALE_BYTES = [0, 1, 2, 3, 4, 60, 120, 127, 130, 200, 245, 246, 247, 250, 252, 253, 254, 255]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_code_times_every_extreme_scale(dtype):
    """All 256 e4m3 codes (subnormals, -0, NaN) and all e2m1 byte pairs against extreme scales."""
    n = len(SCALE_BYTES)
    e8m0 = torch.tensor(SCALE_BYTES, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).expand(n, 256).contiguous()  # [n, 256]
    for scale in (e8m0, e8m0.float()):
        w8, s8 = codes.view(torch.float8_e4m3fn), scale[:, None]  # block (1, 256): one scale per row
        assert same_bits(dequantize_fp8_as(w8, s8, dtype, (1, 256)), dequantize_fp8(w8, s8, (1, 256)).to(dtype))
        w8, s8 = w8[:, :255], s8  # odd width: the one-byte table
        assert same_bits(dequantize_fp8_as(w8, s8, dtype, (1, 256)), dequantize_fp8(w8, s8, (1, 256)).to(dtype))
        w4, s4 = codes.view(torch.int8), scale[:, None].expand(n, 16).contiguous()  # 512 elements a row
        assert same_bits(dequantize_fp4_as(w4, s4, dtype), dequantize_fp4(w4, s4).to(dtype))


def test_meta_construction_then_assign_load():
    g = torch.Generator().manual_seed(0)
    w8, w4 = torch.randn(200, 300, generator=g), torch.randn(64, 96, generator=g)
    q8, s8 = quantize_fp8(w8)
    q4, s4 = quantize_fp4(w4)
    with torch.device("meta"):
        a, b = FP8Linear(300, 200), FP4Linear(96, 64)
    assert a.weight.is_meta and b.scale.is_meta
    assert set(a.state_dict()) == set(b.state_dict()) == {"weight", "scale"}
    a.load_state_dict({"weight": q8, "scale": s8}, assign=True)
    b.load_state_dict({"weight": q4, "scale": s4.float()}, assign=True)  # a float32-scale checkpoint
    assert (a.weight.dtype, a.scale.dtype) == (torch.float8_e4m3fn, torch.float8_e8m0fnu)
    assert (b.weight.dtype, b.scale.dtype) == (torch.int8, torch.float32)
    assert torch.equal(a.dequantized(), dequantize_fp8(q8, s8))
    assert torch.equal(b.dequantized(), dequantize_fp4(q4, s4))
    x = torch.randn(3, 300)
    assert torch.equal(a(x), F.linear(x, dequantize_fp8(q8, s8)))

    # buffers are the packed sizes: 1 byte (FP8) or half a byte (FP4) a weight, 1 or 4 bytes a scale
    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in m.buffers())
    assert nbytes(a) == 200 * 300 + 2 * 3
    assert nbytes(b) == 64 * 96 // 2 + 64 * 3 * 4


def test_fp4_storage_dtypes_and_bad_dtypes_on_load():
    q4, s4 = quantize_fp4(torch.randn(8, 64))
    for stored in (q4.view(torch.uint8), q4.view(torch.float4_e2m1fn_x2)):
        with torch.device("meta"):
            m = FP4Linear(64, 8)
        m.load_state_dict({"weight": stored, "scale": s4}, assign=True)
        assert m.weight.dtype == torch.int8 and torch.equal(m.weight, q4)
    with torch.device("meta"):
        m = FP8Linear(64, 8)
    with pytest.raises(RuntimeError, match="weight: torch.bfloat16"):
        m.load_state_dict({"weight": torch.zeros(8, 64, dtype=torch.bfloat16),
                           "scale": torch.zeros(1, 1, dtype=torch.float8_e8m0fnu)}, assign=True)
    with pytest.raises(RuntimeError, match="scale: torch.bfloat16"):
        m.load_state_dict({"weight": torch.zeros(8, 64, dtype=torch.float8_e4m3fn),
                           "scale": torch.zeros(1, 1, dtype=torch.bfloat16)}, assign=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        FP4Linear(48, 8)


def test_set_quant_impl_over_a_module_tree():
    tree = nn.Sequential(make("fp8", 12, 16, 4), nn.ReLU(), nn.Sequential(make("fp4", 16, 64, 4)))
    assert [m.impl for m in (tree[0], tree[2][0])] == ["fast", "fast"]
    assert set_quant_impl(tree, "reference") == 2
    assert [m.impl for m in (tree[0], tree[2][0])] == ["reference", "reference"]
    with pytest.raises(ValueError, match="impl must be"):
        set_quant_impl(tree, "triton")
    assert set(tree.state_dict()) == {"0.weight", "0.scale", "2.0.weight", "2.0.scale"}


def test_quantize_linear_rejects():
    with pytest.raises(ValueError, match="bias"):
        quantize_linear(nn.Linear(64, 8), "fp8")
    with pytest.raises(ValueError, match="kind"):
        quantize_linear(nn.Linear(64, 8, bias=False), "int4")
    with pytest.raises(ValueError, match="square"):
        quantize_linear(nn.Linear(64, 8, bias=False), "fp8", (1, 128))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cuda_fast_is_bitwise_the_reference(case, dtype):
    mod = make(*case).cuda()
    for lead in SHAPES:
        x = inputs(mod, lead, dtype).cuda()
        set_quant_impl(mod, "reference")
        ref = mod(x)
        set_quant_impl(mod, "fast")
        assert same_bits(mod.dequantized(dtype).cpu(), oracle(mod).cpu().to(dtype))
        assert same_bits(mod(x), ref), lead
