"""bench/flash_layers.py and bench/gpu_flash.py at DeepSeek-V4-Flash's real per-layer widths, with 8 routed
experts (not 256) and a 16,384-token vocabulary (not 129,280) so that it fits a test: the official tensor
names, dtypes and shapes; weights resident within 1.2x of the file bytes; a 256-token prefill and two decode
steps on the fast quantised path whose logits equal, bit for bit, those of the same checkpoint loaded
dequantised (bf16 nn.Linear); and the GPU script's CPU smoke run, which also compares every quantised linear
shape of a Flash layer on its fast and reference implementations (one row: the tiled decode path, and three).
The model-level replay on the reference implementation is the CLI's (bench/flash_layers.py), at full size."""

import json

import pytest
import torch
from safetensors import safe_open

from bench import flash_layers, gpu_flash
from runtime.model import load_model
from runtime.qlinear import set_quant_impl
from runtime.quant import dequantize_fp4, dequantize_fp8

LAYERS, EXPERTS, VOCAB, TOKENS, DECODE = 2, 8, 16384, 256, 2
pytestmark = pytest.mark.slow  # about a minute: Flash-wide FP8 / FP4 matrices dequantised on one thread


@pytest.fixture(scope="module")
def flash_dir(tmp_path_factory):
    return flash_layers.write_checkpoint(tmp_path_factory.mktemp("flash"), LAYERS, EXPERTS, seed=0, vocab=VOCAB)


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def headers(folder) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(folder / fname, framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = (s.get_dtype(), tuple(s.get_shape()))
    assert set(out) == set(index["weight_map"])
    return out


F8, E8, I8, BF, F32, I64 = "F8_E4M3", "F8_E8M0", "I8", "BF16", "F32", "I64"
# (name, safetensors dtype, shape) from the spec's table of the released Flash checkpoint (§5.1)
OFFICIAL = [
    ("embed.weight", BF, (VOCAB, 4096)), ("head.weight", BF, (VOCAB, 4096)), ("norm.weight", BF, (4096,)),
    ("hc_head_fn", F32, (4, 16384)), ("hc_head_base", F32, (4,)), ("hc_head_scale", F32, (1,)),
    ("layers.0.hc_attn_fn", F32, (24, 16384)), ("layers.1.hc_ffn_base", F32, (24,)), ("layers.1.hc_ffn_scale", F32, (3,)),
    ("layers.0.attn_norm.weight", BF, (4096,)), ("layers.0.attn.attn_sink", F32, (64,)),
    ("layers.0.attn.wq_a.weight", F8, (1024, 4096)), ("layers.0.attn.wq_a.scale", E8, (8, 32)),
    ("layers.0.attn.q_norm.weight", BF, (1024,)),
    ("layers.0.attn.wq_b.weight", F8, (32768, 1024)), ("layers.0.attn.wq_b.scale", E8, (256, 8)),
    ("layers.1.attn.wkv.weight", F8, (512, 4096)), ("layers.1.attn.wkv.scale", E8, (4, 32)),
    ("layers.1.attn.kv_norm.weight", BF, (512,)),
    ("layers.0.attn.wo_a.weight", F8, (8192, 4096)), ("layers.0.attn.wo_a.scale", E8, (64, 32)),
    ("layers.1.attn.wo_b.weight", F8, (4096, 8192)), ("layers.1.attn.wo_b.scale", E8, (32, 64)),
    # layer 0 is CSA (overlapping compressor + indexer), layer 1 HCA
    ("layers.0.attn.compressor.wkv.weight", BF, (1024, 4096)), ("layers.0.attn.compressor.ape", F32, (4, 1024)),
    ("layers.0.attn.compressor.norm.weight", BF, (512,)),
    ("layers.1.attn.compressor.wgate.weight", BF, (512, 4096)), ("layers.1.attn.compressor.ape", F32, (128, 512)),
    ("layers.0.attn.indexer.wq_b.weight", F8, (8192, 1024)), ("layers.0.attn.indexer.wq_b.scale", E8, (64, 8)),
    ("layers.0.attn.indexer.weights_proj.weight", BF, (64, 4096)),
    ("layers.0.attn.indexer.compressor.wkv.weight", BF, (256, 4096)),
    ("layers.0.attn.indexer.compressor.ape", F32, (4, 256)), ("layers.0.attn.indexer.compressor.norm.weight", BF, (128,)),
    # layer 0 hash-routed, layer 1 score-routed
    ("layers.0.ffn.gate.weight", BF, (EXPERTS, 4096)), ("layers.0.ffn.gate.tid2eid", I64, (VOCAB, 6)),
    ("layers.1.ffn.gate.bias", F32, (EXPERTS,)),
    ("layers.0.ffn.experts.7.w1.weight", I8, (2048, 2048)), ("layers.0.ffn.experts.7.w1.scale", E8, (2048, 128)),
    ("layers.1.ffn.experts.0.w2.weight", I8, (4096, 1024)), ("layers.1.ffn.experts.0.w2.scale", E8, (4096, 64)),
    ("layers.1.ffn.experts.3.w3.weight", I8, (2048, 2048)),
    ("layers.0.ffn.shared_experts.w1.weight", F8, (2048, 4096)), ("layers.0.ffn.shared_experts.w1.scale", E8, (16, 32)),
    ("layers.1.ffn.shared_experts.w2.weight", F8, (4096, 2048)), ("layers.1.ffn.shared_experts.w2.scale", E8, (32, 16)),
]
ABSENT = ["layers.0.ffn.gate.bias", "layers.1.ffn.gate.tid2eid", "layers.1.attn.indexer.wq_b.weight",
          "layers.0.attn.compressor.wkv.scale", "layers.0.ffn.gate.scale", "mtp.0.enorm.weight"]


def test_official_names_dtypes_and_shapes(flash_dir):
    have = headers(flash_dir)
    for name, dtype, shape in OFFICIAL:
        assert have.get(name) == (dtype, shape), name
    assert not set(ABSENT) & set(have)
    expert_tensors = [n for n in have if ".ffn.experts." in n]
    assert len(expert_tensors) == LAYERS * EXPERTS * 3 * 2  # w1/w2/w3, weight + scale
    quantised = {n for n, (dt, _) in have.items() if dt in (F8, I8)}
    assert {n.removesuffix(".weight") + ".scale" for n in quantised} <= set(have)
    cfg = json.loads((flash_dir / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                          "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    assert cfg["expert_dtype"] == "fp4" and cfg["compress_ratios"] == [4, 128] and cfg["num_hash_layers"] == 1
    index = json.loads((flash_dir / "model.safetensors.index.json").read_text())
    assert [index["weight_map"][n] for n in ("layers.0.attn.wq_a.weight", "layers.1.attn.wq_a.weight", "embed.weight")] \
        == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]


def test_random_codes_are_valid_and_scaled(flash_dir):
    f = flash_dir / "model-00001-of-00003.safetensors"
    with safe_open(f, framework="pt") as h:
        w8, s8 = h.get_tensor("layers.0.attn.wq_b.weight"), h.get_tensor("layers.0.attn.wq_b.scale")
        w4, s4 = h.get_tensor("layers.0.ffn.experts.3.w2.weight"), h.get_tensor("layers.0.ffn.experts.3.w2.scale")
        tid2eid = h.get_tensor("layers.0.ffn.gate.tid2eid")
    assert not ((w8.view(torch.uint8) & 0x7F) == 0x7F).any()  # no e4m3 NaN code
    assert s8.view(torch.uint8).max() < 255 and s4.view(torch.uint8).max() < 255  # no e8m0 NaN
    assert len(s8.view(torch.uint8).unique()) == 3  # scales vary block to block
    for w, fan_in in ((dequantize_fp8(w8, s8), 1024), (dequantize_fp4(w4, s4), 2048)):
        assert 0.5 < w.std().item() * fan_in ** 0.5 < 2, fan_in  # std ~ fan_in^-0.5
    rows = tid2eid.sort(-1).values
    assert tid2eid.min() >= 0 and tid2eid.max() < EXPERTS and (rows[:, 1:] != rows[:, :-1]).all()  # distinct


def test_quantised_run_equals_dequantised_reference(flash_dir, two_threads):
    rec, fast = flash_layers.measure(flash_dir, TOKENS, DECODE, chunk=TOKENS, dtype=torch.bfloat16, reference=False)
    assert rec["resident_bytes"] <= 1.2 * rec["file_bytes"]
    assert rec["resident_bytes"] > 0.9 * rec["file_bytes"]  # the experts really are resident, not skipped
    assert rec["finite"] and len(rec["decode_ms"]) == DECODE and fast.shape == (DECODE + 1, VOCAB)
    assert fast.std() > 0.1  # not a degenerate (constant) output
    # The same checkpoint dequantised at load: plain bf16 nn.Linear weights, no FP8Linear / FP4Linear.
    dense = load_model(flash_dir, dtype=torch.bfloat16, quantized="dequantize", decode="eager")
    assert set_quant_impl(dense, "fast") == 0
    assert dense.layers[0].ffn.experts["7"].w1.weight.dtype == torch.bfloat16
    ref = flash_layers.run_ids(dense, flash_layers.random_ids(VOCAB, TOKENS), DECODE, TOKENS, forced=rec["tokens_out"])
    assert ref["cache"].length == TOKENS + DECODE
    assert torch.equal(fast, ref["logits"])


def test_gpu_script_cpu_smoke(flash_dir, tmp_path, two_threads):
    out = tmp_path / "gpu_flash.json"
    code = gpu_flash.main(["--device", "cpu", "--out", str(flash_dir), "--layers", str(LAYERS), "--experts",
                           str(EXPERTS), "--vocab", str(VOCAB), "--tokens", "256", "--decode", "2", "--no-reference",
                           "--matmul-tokens", "1,3", "--reps", "0", "--threads", "2", "--json", str(out)])
    assert code == 0
    rec = json.loads(out.read_text())
    assert rec["wrote_checkpoint"] is False and rec["world_size"] == 1
    (run,) = rec["runs"]
    assert run["tokens"] == 256 and run["prefill_tok_s"] > 0 and len(run["decode_ms"]) == 2
    w = rec["decode_weight_bytes"]
    per_expert = 3 * 2048 * 4096 // 2 + 3 * 2048 * 4096 // 32  # FP4 bytes + e8m0 scales of w1, w2, w3
    assert w["routed"] == LAYERS * 6 * per_expert and w["head"] == VOCAB * 4096 * 2
    assert 0 < run["decode_share_of_copy_bw"] and run["decode_share_of_spec_bw"] is None
    assert len(rec["matmuls"]) == len(gpu_flash.LINEARS) * 2
    assert all(m["equal"] and m["oracle_equal"] and m["max_abs"] == 0 for m in rec["matmuls"])
