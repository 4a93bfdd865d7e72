"""Training-only code (train/): the auxiliary probes recompute exactly what the runtime computes, and the
structured init lays the CSA compressor's slots out as documented."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import runtime
from runtime.config import HCA, ModelConfig
from runtime.model import Transformer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "train"))

import retrieval_losses  # noqa: E402


def _load(name: str, path: Path):
    """train/train.py by path: `import train` can resolve to the train/ folder as a namespace package."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


T = _load("longlens_train_script", REPO / "train" / "train.py")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = dict(T.CONFIG, hidden_size=64, head_dim=32, qk_rope_head_dim=8, partial_rotary_factor=0.25, q_lora_rank=32, o_lora_rank=16,
               index_head_dim=16, moe_intermediate_size=32)
    return Transformer(ModelConfig.from_dict(cfg)).init_weights(3).eval()


def test_hca_probe_matches_the_runtime(model):
    layer = model.config.layer_types.index(HCA)
    probe = retrieval_losses.HCAProbe(model, layer)
    ids = torch.randint(5, 8000, (1, 700), generator=torch.Generator().manual_seed(1))
    cap, cache = runtime.Capture(), model.new_cache()
    with torch.no_grad():
        model(ids, cache, capture=cap)
        pos = torch.randint(127, 700, (16,), generator=torch.Generator().manual_seed(2))
        mass = probe.entry_mass(cache, 16, torch.Generator().manual_seed(2))
        as_if = probe.entry_mass(cache, 16, torch.Generator().manual_seed(2), as_if_entries=8192)
    assert mass.item() == pytest.approx(cap.record(layer).mass[0, pos, 1].mean().item(), rel=1e-4, abs=1e-6)
    assert as_if > mass  # the same logits over 8,192 entries take a larger share
    probe.remove()


def test_probes_follow_a_position_skip(model):
    """With RoPE positions skipping ahead mid-sequence (train.py pick_skip), the probes recompute what the
    two-call forward computed: the HCA entry share and the lightning indexer's keys."""
    layer = model.config.layer_types.index(HCA)
    csa = model.config.layer_types.index(runtime.config.CSA)
    hp, cp = retrieval_losses.HCAProbe(model, layer), retrieval_losses.CSAProbe(model, csa)
    ids = torch.randint(5, 8000, (1, 700), generator=torch.Generator().manual_seed(1))
    skip = (256, 40_960)
    cap, cache = runtime.Capture(), model.new_cache()
    try:
        with torch.no_grad():
            hp.begin(skip), cp.begin(skip)
            model.hidden(ids[:, :256], cache, capture=cap)
            model.hidden(ids[:, 256:], cache, capture=cap, position_offset=skip[1])
            assert hp.x.shape[1] == cp.x.shape[1] == cp.y.shape[1] == 700
            pos = torch.randint(127, 700, (16,), generator=torch.Generator().manual_seed(2))
            mass = hp.entry_mass(cache, 16, torch.Generator().manual_seed(2))
            assert mass.item() == pytest.approx(cap.record(layer).mass[0, pos, 1].mean().item(), rel=1e-4, abs=1e-6)
            hp.skip = None  # without the skip the probe computes something else
            assert hp.entry_mass(cache, 16, torch.Generator().manual_seed(2)).item() != pytest.approx(mass.item(), rel=1e-3)
            st = retrieval_losses.CompressorState()
            ix = cp.indexer.compressor
            ix(cp.x[:, :256], st, cp.attn.inv_freq)
            ix(cp.x[:, 256:], st, cp.attn.inv_freq, skip[1])
            torch.testing.assert_close(st.entries.view(), cache.layers[csa].index.entries.view())
            rp = retrieval_losses.rope_positions(torch.tensor([0, 255, 256, 699]), skip)
            assert rp.tolist() == [0, 255, 256 + 40_960, 699 + 40_960]
    finally:
        hp.remove(), cp.remove()


def test_pick_skip_separates_the_asked_value_from_the_question():
    import random
    meta = [{"src_end": 1000, "first_ans": 5000}]
    got = [T.pick_skip(random.Random(i), meta, 0.7, 262_144) for i in range(300)]
    hits = [g for g in got if g is not None]
    assert 0.6 < len(hits) / len(got) < 0.8
    for at, gap in hits:
        assert at % 128 == 0 and 1000 <= at <= 5000 - 64
        assert gap % 128 == 0 and 4096 <= gap <= 262_144
    assert max(g for _, g in hits) > 65_536 and min(g for _, g in hits) < 16_384  # log-uniform spread
    assert T.pick_skip(random.Random(0), meta, 0.0, 262_144) is None
    # value right before the question: the skip still lands before the question
    near = [T.pick_skip(random.Random(i), [{"src_end": 4990, "first_ans": 5000}], 1.0, 8192) for i in range(50)]
    assert all(128 <= at <= 5000 - 64 for at, _ in near)
    assert T.pick_skip(random.Random(1), [{"src_end": 0, "first_ans": 100}], 1.0, 8192) is None  # no room


def test_make_batch_records_where_a_skip_may_go():
    import random
    pool = T.tasks.TokenPool.from_texts(["The quick brown fox jumps over the lazy dog. " * 400], T.Tokenizer.default())
    ids, lm_pos, ans, meta = T.make_batch(random.Random(3), pool, T.Tokenizer.default(), 2048, 1, 0.02,
                                          mix=[["niah", 1.0]], task_opts={"value_fmt": "number", "max_needles": 1})
    m = meta[0]
    assert 0 < m["src_end"] < m["first_ans"] == min(ans[0][0])


def test_slot_layout(model):
    with torch.no_grad():
        T.slot_layout(model, 5.0)
    for blk in model.layers:
        if blk.attn.indexer is None:
            continue
        comp = blk.attn.compressor
        r, d = comp.rate, comp.dim
        ape = comp.ape.detach()  # [r, 2d]: previous window's half, then the current window's
        alpha = torch.softmax(torch.cat([ape[:, :d], ape[:, d:]], 0), dim=0)  # [2r slots, d]: bias alone
        for s in range(r):
            ch = slice(s * d // r, (s + 1) * d // r)
            assert (alpha[r + s, ch] > 0.95).all()  # channel group s reads token s of the current window
        assert (alpha[:r] < 0.01).all()  # the previous window's half starts switched off


def test_rope_free_slot_layout():
    """rope_free keeps every slot's channels out of the RoPE-rotated ones, which pool the window evenly."""
    torch.manual_seed(0)
    cfg = dict(T.CONFIG, hidden_size=64, head_dim=32, qk_rope_head_dim=8, partial_rotary_factor=0.25,
               q_lora_rank=32, o_lora_rank=16, index_head_dim=16, moe_intermediate_size=32)
    m = Transformer(ModelConfig.from_dict(cfg)).init_weights(3)
    with torch.no_grad():
        T.slot_layout(m, 5.0, rope_free=True)
    comp = next(b.attn.compressor for b in m.layers if b.attn.indexer is not None)
    r, d, R = comp.rate, comp.dim, 8
    alpha = torch.softmax(comp.ape.detach().view(r, 2, d).transpose(0, 1).reshape(2 * r, d), dim=0)
    for s in range(r):
        ch = slice(s * (d - R) // r, (s + 1) * (d - R) // r)
        assert (alpha[r + s, ch] > 0.95).all()
    even = alpha[r:, d - R:]  # the current window's slots share the RoPE channels (the previous half ~off)
    torch.testing.assert_close(even, even[:1].expand_as(even))
    assert (even > 0.24).all()


def test_free_rope_channels_pools_them_evenly(model):
    """After free_rope_channels a token's content no longer reaches an entry's RoPE channels alone:
    they are the plain mean of the window's projections, whatever the gate projection had learned."""
    from runtime.cache import CompressorState
    import copy
    m = copy.deepcopy(model)
    blk = next(b for b in m.layers if b.attn.indexer is not None)
    comp = blk.attn.compressor
    with torch.no_grad():
        comp.wgate.weight.normal_()
        comp.ape.normal_()
        comp.ape[:, :comp.dim] -= 30.0  # a trained layout keeps the previous window's half far down (~-5)
        T.free_rope_channels(m)
        R, d = m.config.qk_rope_head_dim, comp.dim
        assert not comp.wgate.weight[d - R:d].any() and not comp.wgate.weight[2 * d - R:].any()
        assert not comp.ape[:, 2 * d - R:].any() and (comp.ape[:, d - R:d] <= comp.ape[:, :d - R].min()).all()
        x = torch.randn(1, 8, m.config.hidden_size)
        st = CompressorState()
        comp(x, st, torch.zeros(m.config.qk_rope_head_dim // 2))  # zero frequencies: no rotation
        kv = comp.wkv(x)[0, :, d:].view(2, 4, d)  # current-window half, per window
        pooled = kv.mean(1)  # [2, d]
        got = st.entries.view()[0, :, d - R:] / comp.norm.weight[d - R:]
        # RMSNorm scales the whole row by one factor: the RoPE channels are proportional to the window mean
        ratio = got / pooled[:, d - R:]
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-4)


def test_batch_workers_build_the_serial_batches():
    """Batches built ahead in worker processes are the serial loop's, KL seed included."""
    import tasks
    from runtime.tokenizer import Tokenizer

    tok = Tokenizer.default()
    text = (REPO / "assets" / "examples" / "lighthouse_log.md").read_text()
    pool = tasks.TokenPool.from_texts([text] * 4, tok)
    mix, task = [["niah", 0.5], ["kv", 0.5]], {"value_fmt": "number", "max_needles": 3}
    workers = T.BatchWorkers(2, pool, tok)
    try:
        got = list(workers.stage(11, 5, 9, 600, 2, 0.05, mix, task))
    finally:
        workers.close()
    for step, (ids, lm_pos, ans, meta, kl_seed) in zip(range(5, 9), got):
        rng = T.step_rng(11, step)
        ids2, lm_pos2, ans2, meta2 = T.make_batch(rng, pool, tok, 600, 2, 0.05, mix=mix, task_opts=task)
        assert torch.equal(ids, ids2) and lm_pos == lm_pos2 and ans == ans2 and meta == meta2
        assert kl_seed == rng.randrange(1 << 30)
    assert len({tuple(g[0][0, :50].tolist()) for g in got}) == 4  # each step its own batch


def test_last_p_puts_the_asked_needle_right_before_the_question(monkeypatch):
    """last_p: the first asked needle is the haystack's last line and no recap follows it; 0 changes nothing."""
    import tasks
    from runtime.tokenizer import Tokenizer

    tok = Tokenizer.default()
    text = (REPO / "assets" / "examples" / "lighthouse_log.md").read_text()
    pool = tasks.TokenPool.from_texts([text] * 4, tok)
    task = {"value_fmt": "number", "max_needles": 4, "edge_p": 0.5}
    last = 0
    for step in range(40):
        ex = tasks.make_example("niah", T.step_rng(3, step), pool, 500, **task, last_p=0.5)
        vs, ve = ex.qas[0].value_chars
        if ex.no_recap:
            last += 1
            assert ex.haystack.rstrip("\n").endswith(ex.haystack[vs:ve] + ".")  # the last line holds the answer
            assert ve == max(e for _, e in ex.items)
        a = tasks.make_example("niah", T.step_rng(3, step), pool, 500, **task)
        b = tasks.make_example("niah", T.step_rng(3, step), pool, 500, **task, last_p=0.0)
        assert a == b and not a.no_recap  # the option off draws exactly as before
    assert 10 <= last <= 30
    # make_batch gives such an example no recap, even when every other example gets one
    recapped = []
    monkeypatch.setattr(tasks, "add_recap", lambda ex, rng: recapped.append(ex.no_recap) or ex)
    for step in range(20):
        T.make_batch(T.step_rng(3, step), pool, tok, 600, 1, 0.0, mix=[["niah", 1.0]], task_opts=dict(task, last_p=0.5),
                     recap_p=1.0)
    assert 0 < len(recapped) < 20 and not any(recapped)


def test_sharded_export_loads(tmp_path):
    """--shard-mb splits the weights into files of at most that size; the runtime loads the folder as one."""
    model = T.build_model(5)
    T.export(model, tmp_path, shard_mb=12)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 3 and all(f.stat().st_size <= 12 * 2**20 + 2**16 for f in files)
    loaded = runtime.load_model(tmp_path)
    ref = T.export_state(model)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_time_budget_fits_the_last_stage(tmp_path, monkeypatch):
    """--time-budget: once the last stage's warm-up is timed, its length is cut to what the time left allows
    (logged) and its cosine runs to that end; stage ends are exported as loadable shards; --init-from
    starts from an exported folder."""
    import json
    import tasks

    text = (REPO / "assets" / "examples" / "lighthouse_log.md").read_text()
    monkeypatch.setattr(tasks.TokenPool, "corpus",
                        classmethod(lambda cls, split, max_bytes, tok, **kw: cls.from_texts([text] * 8, tok)))
    opts = {"mix": [["niah", 1.0]], "task": {"value_fmt": "number", "max_needles": 2}}
    exp = {"stages": [["a", 3, 256, 1, False, 1e-4, opts], ["b", 100_000, 256, 1, False, 1e-4, opts]]}
    out = tmp_path / "run"
    T.main(["--out", str(out), "--init-from", str(REPO / "assets" / "model"), "--device", "cpu",
            "--time-budget", "0.5", "--eval-every", "0", "--export-stages", str(out / "exp"), "--shard-mb", "15",
            "--experiment", json.dumps(exp)])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    fitted = [r["fitted_steps"] for r in log if "fitted_steps" in r]
    steps = [r for r in log if "sec" in r]
    assert len(fitted) == 1 and 31 <= fitted[0] < 100_000
    last = steps[-1]
    assert last["stage"] == "b" and last["step"] <= 3 + fitted[0]
    # from the fit on, the cosine runs over the fitted length (over 100,000 steps it would still be at peak)
    assert last["lr"] == pytest.approx(T.lr_at(last["step"] - 1 - 3, fitted[0], 1e-4))
    if last["step"] - 1 - 3 >= 40:  # past the warm-up
        assert T.lr_at(last["step"] - 1 - 3, 100_000, 1e-4) > 0.99e-4 > last["lr"]
    assert (out / "exp" / "step3").is_dir() and (out / "exp" / f"step{last['step']}").is_dir()
    assert len(list((out / "exp" / "step3").glob("*.safetensors"))) == 2
    first = runtime.load_model(out / "exp" / "step3")  # 3 steps at lr <= 1e-5 from the shipped weights
    shipped = runtime.load_model(REPO / "assets" / "model")
    diff = max((a - b).abs().max().item() for a, b in zip(first.parameters(), shipped.parameters()))
    assert 0 < diff < 1e-2


def test_cpu_recipe(tmp_path, monkeypatch):
    """--recipe cpu: STAGES' first five stages, then long stages with position skips and the asked needle
    last in a share of examples; the model starts with the RoPE-free slot layout."""
    import recipes
    import tasks

    (phase,) = T.RECIPES["cpu"].phases
    stages = phase.stages
    assert stages[:5] == recipes.STAGES[:5] and phase.steps < sum(s.steps for s in recipes.STAGES)
    for st in stages[5:]:
        assert not st.dense_csa and st.seq_len >= 4096 and st.settings["skip_p"] > 0 and st.task["last_p"] > 0
    text = (REPO / "assets" / "examples" / "lighthouse_log.md").read_text()
    monkeypatch.setattr(tasks.TokenPool, "corpus",
                        classmethod(lambda cls, split, max_bytes, tok, **kw: cls.from_texts([text] * 8, tok)))
    out = tmp_path / "run"
    T.main(["--out", str(out), "--recipe", "cpu", "--device", "cpu", "--max-steps", "0", "--eval-every", "0",
            "--export-stages", str(out / "exp")])
    m = runtime.load_model(out / "exp" / "step0")  # the initial weights
    ref = T.build_model(1234, phase.init)
    for blk, rb in zip(m.layers, ref.layers):
        if blk.attn.indexer is not None:
            torch.testing.assert_close(blk.attn.compressor.ape, rb.attn.compressor.ape)
            R = m.config.qk_rope_head_dim
            assert (blk.attn.compressor.ape[:, -R:] == 0).all()  # the RoPE channels pool the window evenly
