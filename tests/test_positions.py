"""Position offsets (Transformer.hidden's position_offset, used by training to skip positions).

RoPE makes every score depend on position differences only, in the sliding window, in the compressed
entries and in the lightning indexer alike, so shifting a whole sequence changes no logit; a skip in the
middle changes only what comes after it; the sparse path stays equal to the eager one."""

import pytest
import torch

from hf_oracle import CSA, HCA, SL, random_hf_model, tiny_config

import runtime

T, SKIP_AT = 200, 96  # 96: a multiple of both compression rates (4, 16), so no window straddles the skip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pos")
    cfg = tiny_config(index_n_heads=4, layer_types=[SL, CSA, HCA, CSA], index_topk=8)
    random_hf_model(cfg, seed=11).save_pretrained(folder)
    return runtime.load_model(folder)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits(model, ids, parts, impl="sparse"):
    """parts: [(end, offset), ...]: feed ids up to each end with that position offset."""
    model.attn_impl = impl
    try:
        cache, out, s = model.new_cache(), [], 0
        for e, off in parts:
            out.append(model.head(model.hidden(ids[:, s:e], cache, position_offset=off)).float())
            s = e
        return torch.cat(out, dim=1)
    finally:
        model.attn_impl = "sparse"


def test_uniform_offset_changes_nothing(model, ids):
    base = logits(model, ids, [(T, 0)])
    for off in (16, 400):
        torch.testing.assert_close(logits(model, ids, [(T, off)]), base, atol=2e-4, rtol=1e-4)


def test_skip_changes_only_what_follows(model, ids):
    base = logits(model, ids, [(T, 0)])
    skipped = logits(model, ids, [(SKIP_AT, 0), (T, 2048)])
    torch.testing.assert_close(skipped[:, :SKIP_AT], base[:, :SKIP_AT])
    assert (skipped[:, SKIP_AT:] - base[:, SKIP_AT:]).abs().max() > 1e-2
    # the skip is a property of positions, not of chunking: the part after it, fed in two chunks, agrees
    torch.testing.assert_close(logits(model, ids, [(SKIP_AT, 0), (150, 2048), (T, 2048)]), skipped,
                               atol=2e-5, rtol=1e-5)


def test_skip_sparse_equals_eager(model, ids):
    parts = [(SKIP_AT, 0), (T, 2048)]
    torch.testing.assert_close(logits(model, ids, parts), logits(model, ids, parts, "eager"), atol=2e-5, rtol=1e-5)


def test_offset_is_checked(model, ids):
    with pytest.raises(ValueError, match="position_offset"):
        model.hidden(ids[:, :8], model.new_cache(), position_offset=-4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.hidden(ids[:, :8], model.new_cache(), position_offset=model.config.max_position_embeddings)
