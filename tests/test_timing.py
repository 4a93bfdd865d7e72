"""runtime/timing.py: the LayerTimer's two granularities attach through hooks and the model's regions only,
leave the logits alone, and leave nothing behind when closed."""

import pytest
import torch

from hf_oracle import tiny_config
from runtime.config import ModelConfig
from runtime.model import Transformer
from runtime.timing import CATEGORIES, COARSE, LayerTimer, region


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.from_dict(tiny_config())).init_weights(0).eval()  # SL, CSA, HCA, CSA


def _ids(n=200, seed=0):
    return torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def _hooked(model) -> list:
    return [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]


def _regions(model) -> list:
    return [m for m in model.modules() if "timer" in m.__dict__]


def test_detailed_timer_times_every_category_and_detaches(model):
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
        with LayerTimer(model) as timer:
            assert _hooked(model) and _regions(model)
            out = model(ids)
            model(ids[:, :1])  # and a one-token forward
    assert torch.equal(out, ref)
    assert not _hooked(model) and not _regions(model) and model.timer is None
    split = timer.snapshot(wall=10.0)
    assert list(split) == list(CATEGORIES)
    for cat in CATEGORIES[:-1]:
        assert split[cat] > 0, cat
    assert sum(split.values()) == pytest.approx(10.0)
    # 4 blocks x 3 mHC regions + the hyper-head, per forward
    assert timer.calls["mhc"] == 2 * (3 * 4 + 1)
    timer.reset()
    assert timer.seconds == {}


def test_one_detailed_timer_per_model(model):
    with LayerTimer(model):
        with pytest.raises(RuntimeError, match="another detailed LayerTimer"):
            LayerTimer(model)
        with LayerTimer(model, detail=False) as coarse:  # the coarse one uses hooks only
            assert coarse.attached
    assert not _hooked(model) and not _regions(model)


def test_coarse_timer_is_attached_only_while_active(model):
    """The engine's mode: attention seconds by layer kind and MoE seconds, hooked around its own forwards."""
    timer = LayerTimer(model, detail=False, attach=False)
    assert not _hooked(model)
    with torch.no_grad():
        for _ in range(2):
            with timer.active():
                assert _hooked(model) and not _regions(model)
                model(_ids())
            assert not _hooked(model)
        model(_ids())  # not counted
    assert set(timer.seconds) == set(COARSE) == {"sliding", "csa", "hca", "moe"}
    assert all(v > 0 for v in timer.seconds.values())
    assert timer.calls == {"sliding": 2, "csa": 4, "hca": 2, "moe": 8}


def test_a_failing_forward_leaves_the_timer_balanced(model):
    def boom(module, args, out):
        raise RuntimeError("boom")

    h = model.layers[1].attn.indexer.compressor.register_forward_hook(boom)
    try:
        with LayerTimer(model) as timer, torch.no_grad():
            with pytest.raises(RuntimeError, match="boom"):
                model(_ids())
            assert not timer._stack  # every region entered was left
            h.remove()
            model(_ids())
            assert not timer._stack
    finally:
        h.remove()
    assert not _hooked(model) and not _regions(model)


def test_region_without_a_timer_is_one_shared_no_op():
    assert region(None, "mhc") is region(None, "indexer")
    with region(None, "mhc") as r:
        assert r is None
