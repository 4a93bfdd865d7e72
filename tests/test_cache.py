"""Cache equivalence: one full forward = chunked prefill (any chunk size) = token-by-token decode =
prefill -> decode -> prefill, for logits and for the captured selections; sparse path = eager path."""

import pytest
import torch

from hf_oracle import CSA, HCA, SL, random_hf_model, tiny_config

import runtime

# index_topk = 8 is far below the number of entries, so the indexer really chooses. Exact ties are
# broken deterministically by the runtime; near-ties (1e-6 apart) can still flip between chunkings,
# as in any top-k under float reassociation, so this sequence length is one where none occurs
# (seed fixed). The long run (T=1100, chunks up to 1000) lives in test_long_chunks_equal_full,
# with index_topk above the entry count, where logits must match exactly in any case.
T = 700


def _model(folder, **over):
    cfg = tiny_config(index_n_heads=4, layer_types=[SL, CSA, HCA, CSA], **over)
    random_hf_model(cfg, seed=7).save_pretrained(folder)
    return runtime.load_model(folder)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("cache"), index_topk=8)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (1, 1100), generator=torch.Generator().manual_seed(5))[:, :T]


@torch.no_grad()
def run(model, ids, bounds, impl="sparse", index_dtype=None):
    model.attn_impl = impl
    try:
        cache, cap, outs = model.new_cache(index_dtype=index_dtype), runtime.Capture(), []
        for s, e in zip(bounds[:-1], bounds[1:]):
            outs.append(model(ids[:, s:e], cache, capture=cap))
        return torch.cat(outs, dim=1), cap, cache
    finally:
        model.attn_impl = "sparse"


def chunks(size):
    return list(range(0, T, size)) + [T]


@pytest.fixture(scope="module")
def reference(model, ids):
    return run(model, ids, [0, T])


def assert_same_selection(cap_a, cap_b):
    """Tie-aware: the multiset of selected scores per query must agree; ids may differ only within ties."""
    for layer in cap_a.layers:
        a, b = cap_a.record(layer), cap_b.record(layer)
        torch.testing.assert_close(a.positions, b.positions)
        torch.testing.assert_close(a.mass, b.mass, atol=2e-5, rtol=1e-4)
        if a.selected is None:
            torch.testing.assert_close(a.weights, b.weights, atol=2e-5, rtol=1e-4)
            continue
        sa, sb = a.scores.sort(dim=-1).values, b.scores.sort(dim=-1).values
        torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-4)
        same = (a.selected.sort(-1).values == b.selected.sort(-1).values).all(-1)
        assert same.float().mean() > 0.99  # differences only where exact ties exist


@pytest.mark.parametrize("size", [1, 3, 127, 128, 1000])
def test_long_chunks_equal_full(tmp_path, size):
    model = _model(tmp_path, index_topk=512)
    ids = torch.randint(0, 97, (1, 1100), generator=torch.Generator().manual_seed(5))
    full, _, _ = run(model, ids, [0, 1100])
    out, _, cache = run(model, ids, list(range(0, 1100, size)) + [1100])
    torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)
    assert cache.length == 1100


@pytest.mark.parametrize("size", [1, 3, 127, 128, 600])
def test_chunked_prefill_equals_full(model, ids, reference, size):
    full, cap_full, cache_full = reference
    out, cap, cache = run(model, ids, chunks(size))
    torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)
    assert_same_selection(cap, cap_full)
    assert cache.nbytes() == cache_full.nbytes() and cache.length == T


def test_prefill_decode_prefill(model, ids, reference):
    full, cap_full, _ = reference
    bounds = [0, 400] + list(range(401, 440)) + [600, 601, 602, T]  # a chat: prompt, answer, new turn
    out, cap, _ = run(model, ids, bounds)
    torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)
    assert_same_selection(cap, cap_full)


def test_sparse_equals_eager(model, ids, reference):
    full, cap_full, _ = reference
    out, cap, _ = run(model, ids[:, :500], [0, 200, 201, 500], impl="eager")
    torch.testing.assert_close(out, full[:, :500], atol=1e-4, rtol=1e-4)
    sparse_out, sparse_cap, _ = run(model, ids[:, :500], [0, 200, 201, 500])
    assert_same_selection(cap, sparse_cap)


@pytest.mark.parametrize("block", [1, 37, 700])
def test_query_block_size_changes_nothing(model, ids, reference, block):
    """Larger query blocks (fewer kernel launches on a GPU) give the same outputs and selections."""
    full, cap_full, _ = reference
    for blk in model.layers:
        blk.attn.query_block = block
    try:
        out, cap, _ = run(model, ids, [0, T])
    finally:
        for blk in model.layers:
            blk.attn.query_block = 128
    torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)
    assert_same_selection(cap, cap_full)


def test_decode_without_capture(model, ids, reference, monkeypatch):
    """Without a capture, HCA entries every query of a block sees go through the fused passes
    (dense_attention) in prefill and decode; the logits match the captured full forward."""
    import runtime.attention as ra

    calls = []
    real = ra.dense_attention
    monkeypatch.setattr(ra, "dense_attention", lambda *a: calls.append(a[1].shape[1]) or real(*a))
    full, _, _ = reference
    cache, outs = model.new_cache(), []
    bounds = [0, 300] + list(range(301, 340))
    with torch.no_grad():  # as inference runs (under autograd the fused passes are off: their backward is partial)
        for s, e in zip(bounds[:-1], bounds[1:]):
            outs.append(model(ids[:, s:e], cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), full[:, :339], atol=1e-4, rtol=1e-4)
    assert len(calls) >= 39 and max(calls) == 339 // model.config.compress_rates[HCA]


@pytest.mark.parametrize("n,parts", [(1, 1), (300, 1), (513, 2), (1000, 3), (8192, 2)])
def test_dense_attention_runs(n, parts):
    """Attention split into runs of entries (one flash pass each) and merged through the runs'
    log-sum-exps equals one softmax over all entries."""
    from runtime.attention import dense_attention

    g = torch.Generator().manual_seed(n)
    q, e = torch.randn(2, 3, 4, 32, generator=g), torch.randn(2, n, 32, generator=g)
    o, lse = dense_attention(q, e, 32 ** -0.5, parts)
    logits = torch.einsum("bqhd,bnd->bhqn", q, e) * 32 ** -0.5
    torch.testing.assert_close(torch.logsumexp(lse, -1), torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-5)
    merged = torch.einsum("bhqp,bqhpd->bqhd", lse.softmax(-1), o)
    torch.testing.assert_close(merged, torch.einsum("bhqn,bnd->bqhd", logits.softmax(-1), e), atol=1e-5, rtol=1e-5)


def test_selection_really_sparse(model, reference):
    """Each CSA query reads at most index_topk entries, and only visible (past) ones."""
    _, cap, cache = reference
    k = model.config.index_topk
    for layer in cap.layers:
        rec = cap.record(layer)
        if rec.selected is None:
            continue
        assert rec.selected.shape[-1] <= k
        thr = (rec.positions + 1) // 4
        assert (rec.selected < thr[None, :, None]).all()
        picks = (rec.selected >= 0).sum(-1)[0]
        torch.testing.assert_close(picks, thr.clamp(max=k))  # every visible slot used until k
        assert torch.allclose(rec.mass.sum(-1), torch.ones_like(rec.mass.sum(-1)), atol=1e-5)


def test_cache_bytes(model, reference):
    _, _, cache = reference
    nb, cfg = cache.nbytes(), model.config
    d, e = cfg.head_dim, 4  # fp32
    assert nb["window"] == cfg.num_hidden_layers * (cfg.sliding_window - 1) * d * e
    assert nb["csa_entries"] == 2 * (T // 4) * d * e
    assert nb["indexer_keys"] == 2 * (T // 4) * cfg.index_head_dim * e
    assert nb["hca_entries"] == (T // 16) * d * e
    assert nb["total"] == sum(v for k, v in nb.items() if k != "total")
    assert cache.dense_nbytes() == cfg.num_hidden_layers * T * d * e
    assert cache.entry_counts() == {"L1.kv": T // 4, "L1.index": T // 4, "L2.kv": T // 16, "L3.kv": T // 4, "L3.index": T // 4}


def test_bf16_indexer_keys(model, ids, reference):
    """Cache(index_dtype=bf16): keys stored in bf16 (half the bytes). The bf16 matmul rounds each
    score to bf16, and its accumulation order depends on the call's shape, so chunked/decode vs full
    and sparse vs eager agree to one bf16 ulp of the scores (not bit-exactly as in fp32); selections
    and logits agree wherever no near-tie flips."""
    full, cap_full, cache_full = run(model, ids, [0, T], index_dtype=torch.bfloat16)
    lc = next(lc for lc in cache_full.layers if lc.index is not None)
    assert lc.index.entries.view().dtype == torch.bfloat16
    assert cache_full.nbytes()["indexer_keys"] * 2 == reference[2].nbytes()["indexer_keys"]

    def close(cap_a, cap_b, min_same, scores=True):
        for layer in cap_a.layers:
            a, b = cap_a.record(layer), cap_b.record(layer)
            if a.selected is None:
                continue
            same = (a.selected.sort(-1).values == b.selected.sort(-1).values).all(-1)
            assert same.float().mean() >= min_same, (layer, same.float().mean())
            if scores:
                torch.testing.assert_close(a.scores.sort(-1).values[same], b.scores.sort(-1).values[same],
                                           atol=1e-3, rtol=8e-3)  # one bf16 ulp is 2^-8 relative
        return same

    out, cap, _ = run(model, ids, [0, 400] + list(range(401, 420)) + [T], index_dtype=torch.bfloat16)
    close(cap, cap_full, 0.98)
    eager, cap_e, _ = run(model, ids[:, :500], [0, 200, 201, 500], impl="eager", index_dtype=torch.bfloat16)
    close(cap_e, run(model, ids[:, :500], [0, 200, 201, 500], index_dtype=torch.bfloat16)[1], 0.98)
    # against fp32 keys: a small perturbation of the selection, nothing more
    close(cap_full, reference[1], 0.8, scores=False)
    torch.testing.assert_close(out[:, :300], full[:, :300], atol=1e-4, rtol=1e-4)  # before any near-tie


@pytest.mark.parametrize("n", [40_000, 262_147])
def test_prefiltered_topk_equals_full_topk(n):
    """Decode picks one query's top-k from all of a long context's entries through a prefilter (chunk
    maxima bound the k-th score); it picks the same entries and scores as the full top-k, ties at the k-th
    score going to the lowest ids, and falls back to the full top-k where the bound admits too much."""
    from runtime.attention import _prefiltered_topk, _topk_lowest_id_ties, select_topk

    g = torch.Generator().manual_seed(n)
    cases = {
        "normal": torch.randn(1, 1, n, generator=g),
        "integers (ties at the k-th)": torch.randint(0, 40, (1, 1, n), generator=g).float(),
        "sparse ReLU": torch.randn(1, 1, n, generator=g).clamp(min=0) * (torch.rand(1, 1, n, generator=g) < 1e-3),
        "all zero": torch.zeros(1, 1, n),
        "peaks at the end": torch.randn(1, 1, n, generator=g) + torch.linspace(0, 40, n),
    }
    used_fast = set()
    for name, scores in cases.items():
        ids, vals = select_topk(scores, torch.tensor([n]), 64)
        ref_ids, ref_vals = _topk_lowest_id_ties(scores, 64)
        assert sorted(ids.flatten().tolist()) == sorted(ref_ids.flatten().tolist()), name
        assert torch.equal(vals.sort(-1).values, ref_vals.sort(-1).values), name
        if _prefiltered_topk(scores, 64) is not None:
            used_fast.add(name)
    assert {"normal", "integers (ties at the k-th)", "peaks at the end"} <= used_fast
    assert "all zero" not in used_fast
    # the tie rule: 100 entries share the k-th score, the lowest ids win
    scores = torch.randn(1, 1, n, generator=g) - 10
    scores[..., 1000:1050] = 5.0
    scores[..., 3000:3100] = 1.0
    ids, _ = select_topk(scores, torch.tensor([n]), 64)
    assert sorted(ids.flatten().tolist()) == list(range(1000, 1050)) + list(range(3000, 3014))


def test_one_query_index_scores():
    """Decode scores a single query against bf16 keys with a grouped block-diagonal matmul; the logits
    match the plain matmul, and the scores those of the same query scored among others (prefill's path)."""
    from runtime.attention import Indexer, one_query_head_sum, one_query_logits

    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 4099):
        keys = torch.randn(n, 64, generator=g).bfloat16()
        q = torch.randn(4, 64, generator=g).bfloat16()
        torch.testing.assert_close(one_query_logits(keys, q).float(), torch.matmul(keys, q.t()).float(),
                                   atol=0, rtol=2 ** -8)  # one bf16 rounding at most (measured: equal)
        s, w = one_query_logits(keys, q), torch.randn(4, generator=g)
        torch.testing.assert_close(one_query_head_sum(s, w), torch.relu(s.float()) @ w, atol=1e-6, rtol=1e-6)
    ix = Indexer(runtime.ModelConfig.from_dict(tiny_config()))
    d = ix.head_dim
    keys = torch.randn(1, 5000, d, generator=g).bfloat16()
    q, w = torch.randn(1, 3, ix.n_heads, d, generator=g), torch.randn(1, 3, ix.n_heads, generator=g)
    many = ix.scores(q, w, keys)
    one = ix.scores(q[:, 2:], w[:, 2:], keys)
    torch.testing.assert_close(one, many[:, 2:], atol=1e-3, rtol=8e-3)


def test_batch_rows_are_independent(model, ids):
    two = torch.cat([ids[:, :300], ids[:, 300:600]])
    with torch.no_grad():
        both = model(two)
        torch.testing.assert_close(both[1:], model(ids[:, 300:600]), atol=1e-5, rtol=1e-5)


def test_logits_to_keep_skips_work_not_state(model, ids, reference):
    """Keeping only the last logits computes the last layer for those positions; the cache is the same."""
    full, _, cache_full = reference
    with torch.no_grad():
        cache = model.new_cache()
        last = model(ids[:, :500], cache, logits_to_keep=3)
        torch.testing.assert_close(last, full[:, 497:500], atol=1e-4, rtol=1e-4)
        rest = model(ids[:, 500:], cache)
    torch.testing.assert_close(rest, full[:, 500:], atol=1e-4, rtol=1e-4)
    assert cache.nbytes() == cache_full.nbytes()


@pytest.mark.parametrize("block", [64, 1000])
def test_sparse_gradients_equal_eager(model, ids, block):
    """Training differentiates the sparse path (train/train.py): its gradients, over several query blocks
    or one, must be the eager reference's."""
    grads = {}
    for impl in ("eager", "sparse"):
        model.attn_impl = impl
        for blk in model.layers:
            blk.attn.query_block = block
        model.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                model(ids[:, :300]).logsumexp(-1).mean().backward()
        finally:
            model.attn_impl = "sparse"
            for blk in model.layers:
                blk.attn.query_block = 128
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["sparse"].keys() == grads["eager"].keys() and len(grads["eager"]) > 20
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["sparse"][n], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------ state, marks
def test_layer_cache_classes_follow_layer_types(model):
    from runtime.cache import CSACache, HCACache, LayerCache

    cache = model.new_cache()
    assert [type(lc) for lc in cache.layers] == [LayerCache, CSACache, HCACache, CSACache]
    assert [lc.compressor_names for lc in cache.layers] == [(), ("kv", "index"), ("kv",), ("kv", "index")]


@torch.no_grad()
def test_mark_rewind_continues_exactly(model, ids):
    """Rewinding to a mark and feeding other tokens equals a cache that never saw the first ones."""
    a = 333  # mid pooling window of both rates
    cache = model.new_cache()
    model(ids[:, :a], cache)
    mark = cache.mark()
    model(ids[:, a:T], cache)  # grows entries (buffers reallocate), replaces windows and buffers
    cache.rewind(mark)
    assert cache.length == a and cache.entry_counts() == {"L1.kv": a // 4, "L1.index": a // 4, "L2.kv": a // 16,
                                                          "L3.kv": a // 4, "L3.index": a // 4}
    other = torch.flip(ids[:, a:a + 50], [1])
    got = model(other, cache)
    fresh = model.new_cache()
    model(ids[:, :a], fresh)
    torch.testing.assert_close(got, model(other, fresh), rtol=0, atol=0)
    with pytest.raises(ValueError, match="forward"):
        model.new_cache().rewind(mark)


@torch.no_grad()
def test_state_round_trip_reserve_and_trim(model, ids):
    cache = model.new_cache(index_dtype=torch.bfloat16)
    model(ids[:, :401], cache)
    state = {k: (None if v is None else v.clone()) for k, v in cache.state().items()}
    counts = cache.entry_counts()
    assert state["L1.kv.entries"].shape[1] == 100 and state["L0.window"].shape[1] == model.config.sliding_window - 1
    back = runtime.Cache.from_state(model.config, state, cache.length, counts,
                                    index_dtype=torch.bfloat16, reserve_tokens=300)
    assert back.layers[1].kv.entries.data.shape[1] == (401 + 300) // 4 + 1  # room reserved once
    assert back.layers[1].index.entries.data.dtype == torch.bfloat16
    assert back.nbytes() == cache.nbytes()
    nxt = ids[:, 401:460]
    torch.testing.assert_close(model(nxt, back), model(nxt, cache), rtol=0, atol=0)
    cache.trim()
    assert all(st.entries.data.shape[1] == st.entries.n for lc in cache.layers for _, st in lc.compressors())
    cache.reserve(2000)
    assert cache.layers[2].kv.entries.data.shape[1] == 2000 // 16 + 1
    torch.testing.assert_close(model(ids[:, 460:470], cache), model(ids[:, 460:470], back), rtol=0, atol=0)
    bad = dict(state)
    bad["L1.kv.entries"] = state["L1.kv.entries"][:, :99]
    with pytest.raises(ValueError, match="L1.kv.entries shape"):
        runtime.Cache.from_state(model.config, bad, 401, counts)


@pytest.mark.parametrize("S, before, window, block", [(256, 0, 8, 8), (512, 100, 128, 128), (1024, 5, 128, 128),
                                                      (384, 300, 8, 32), (64, 3, 8, 16)])
def test_batched_window_blocks_equal_the_block_loop(monkeypatch, S, before, window, block):
    """A sliding layer's prefill chunk in one batched pass (Attention._window_blocks: overlapping key views,
    one band mask, padding rows where the context is short) gives what the per-block loop gives, for chunks
    at the start of the context and after one, batch 2; the loop still serves the rest (capture, CSA/HCA)."""
    from runtime.attention import Attention
    from runtime.config import ModelConfig
    from runtime.model import Transformer

    used = []
    real = Attention._window_blocks
    monkeypatch.setattr(Attention, "_window_blocks", lambda self, *a: used.append(self.layer) or real(self, *a))
    cfg = ModelConfig.from_dict(tiny_config(layer_types=[SL, SL, HCA, CSA], sliding_window=window, index_topk=16))
    model = Transformer(cfg).init_weights(1).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, before + S), generator=torch.Generator().manual_seed(S))
    outs = []
    for batched in (False, True):
        for b in model.layers:
            b.attn.batched_window, b.attn.query_block = batched, block
        used.clear()
        cache = model.new_cache(2)
        with torch.no_grad():
            if before:
                model(ids[:, :before], cache)
            outs.append(model(ids[:, before:], cache))
        assert sorted(set(used)) == ([0, 1] if batched else [])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # captured: the loop (it records per block)
        used.clear()
        model(ids[:, :before + S], model.new_cache(2), capture=runtime.Capture())
    assert not used
