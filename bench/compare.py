"""--compare: the same weights through transformers' DeepseekV4ForCausalLM and the runtime's eager path.

Runs in its own worker process per length (its memory never pollutes the runtime measurement).
Identical inputs everywhere; the runtime and each reference alternate repeat by repeat, so the
ratio runtime/reference is measured under the same contention. Paths:
- full: one forward over all L tokens (transformers materialises O(L^2) masks and logits: small L);
  logits compared at every position.
- chunked: prefill in --chunk pieces through each side's own cache (transformers: DynamicCache(config)),
  logits_to_keep=1 on both; the last position's logits compared.
- eager: the runtime's dense reference path (`model.attn_impl = "eager"`) over all L tokens.
Error metric: max |a - b| / max |b| (b the reference), the parity tests' metric.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from runtime.config import CSA

from .machine import _sync, proc_status, reset_peak_rss, torch_dtype


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max())


def bad_positions(a, b, tol: float = 1e-4) -> dict:
    """Positions whose logits differ by more than tol (relative to max |b|): count, total, first few."""
    e = ((a.float() - b.float()).abs().amax(-1) / b.float().abs().max()).flatten()
    bad = (e > tol).nonzero().flatten()
    return {"count": int(bad.numel()), "of": int(e.numel()), "first": bad[:8].tolist(), "tol": tol}


def _csa_records(cap, cfg) -> dict[int, tuple]:
    """{layer: (selected [S, K] with -1 padding, selected scores [S, K])} from a runtime Capture."""
    out = {}
    for i, t in enumerate(cfg.layer_types):
        if t == CSA and i in cap.layers:
            r = cap.record(i)
            out[i] = (r.selected[0], r.scores[0])
    return out


def _classify(sel_a, score_a, sel_b, score_b, rel_tol: float) -> tuple[set, set]:
    """Positions whose selections differ: (explained by (near-)ties at the k-th score, not explained).

    sel_x [S, K] entry ids (-1 = none), score_x(p, ids) -> scores of those ids in run x. A difference is
    a tie when every id picked by only one run scores within rel_tol (of the row's largest |score|)
    of that run's k-th (lowest picked) score: the two runs then only ordered equal scores differently.
    """
    ties, other = set(), set()
    S = sel_a.shape[0]
    for p in range(S):
        a = set(sel_a[p].tolist()) - {-1}
        b = set(sel_b[p].tolist()) - {-1}
        if a == b:
            continue
        ok = True
        for only, sel, score in ((a - b, sel_a, score_a), (b - a, sel_b, score_b)):
            picked = [i for i in sel[p].tolist() if i >= 0]
            sc = score(p, picked)
            kth, scale = min(sc), max(abs(x) for x in sc) or 1.0
            only_sc = score(p, sorted(only))
            ok &= all(abs(x - kth) <= rel_tol * scale for x in only_sc)
        (ties if ok else other).add(p)
    return ties, other


def selection_check(rt, hf, ids, cfg, logits_rt, logits_hf, logits_eager, tol: float = 1e-4) -> dict:
    """Which logits mismatches come from the indexer's top-k ordering equal scores differently.

    One more (untimed) pass of each path with selections recorded: the runtime through runtime.Capture,
    transformers through forward hooks on its indexers (selection) and their scorers (all scores).
    """
    import torch

    import runtime

    hooks, hf_sel, hf_scores = [], {}, {}
    csa = [i for i, t in enumerate(cfg.layer_types) if t == CSA]
    for i in csa:
        ix = hf.model.layers[i].self_attn.compressor.indexer
        hooks.append(ix.register_forward_hook(lambda m, a, o, i=i: hf_sel.__setitem__(i, o[0])))
        hooks.append(ix.scorer.register_forward_hook(lambda m, a, o, i=i: hf_scores.__setitem__(i, o[0])))
    try:
        with torch.inference_mode():
            hf(ids, use_cache=False)
            cap_s, cap_e = runtime.Capture(), runtime.Capture()
            rt(ids, capture=cap_s)
            rt.attn_impl = "eager"
            try:
                rt(ids, capture=cap_e)
            finally:
                rt.attn_impl = "sparse"
    finally:
        for h in hooks:
            h.remove()
    rs, re_ = _csa_records(cap_s, cfg), _csa_records(cap_e, cfg)

    def from_record(rec):
        sel, sc = rec
        lut = lambda p, ids_: [sc[p][(sel[p] == i).nonzero()[0, 0]].item() for i in ids_]
        return lut

    out = {"csa_layers": csa}
    last = cfg.num_hidden_layers - 1
    for name, other_logits, get_other in (
            ("hf", logits_hf, lambda i: (hf_sel[i], lambda p, ids_: hf_scores[i][p, ids_].tolist())),
            ("eager", logits_eager, lambda i: (re_[i][0], from_record(re_[i])))):
        if other_logits is None:
            continue
        ties, other, first_tie_early = set(), set(), None
        for i in csa:
            sel_o, score_o = get_other(i)
            t, o = _classify(rs[i][0], from_record(rs[i]), sel_o, score_o, rel_tol=1e-6)
            ties |= t
            other |= o
            if i != last and t:
                first_tie_early = min([first_tie_early or 10 ** 12, *t])
        e = ((logits_rt.float() - other_logits.float()).abs().amax(-1) / other_logits.float().abs().max())[0]
        bad = set((e > tol).nonzero().flatten().tolist())
        unexplained = {p for p in bad if p not in ties and (first_tie_early is None or p < first_tie_early)}
        clean = [p for p in range(e.numel()) if p not in ties and (first_tie_early is None or p < first_tie_early)]
        out[name] = {"selection_differs_at": len(ties) + len(other), "tie_only": len(ties),
                     "not_ties": len(other), "bad_logits": len(bad), "bad_logits_unexplained": len(unexplained),
                     "max_err_where_selection_agrees": float(e[clean].max()) if clean else None}
    return out


def random_hf_model(cfg: dict, seed: int = 0):
    """A transformers DeepseekV4ForCausalLM with every parameter random: transformers' init leaves mHC, sinks
    and position biases at 0 / identity, which would hide mistakes (the logits oracle of tests/ and --compare)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg)).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "position_bias" in name or name.endswith((".base", "hc_base", ".scale", "hc_scale")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                E = cfg["n_routed_experts"]
                b.copy_(torch.stack([torch.randperm(E, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def save_random_pair(cfg: dict, folder: str, seed: int = 0) -> None:
    """random_hf_model saved with save_pretrained: the model --compare runs both runtimes on."""
    random_hf_model(cfg, seed).save_pretrained(folder)


def _log(msg: str) -> None:
    print(f"[bench compare pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def measure_compare(spec: dict) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import DeepseekV4ForCausalLM, DynamicCache

    import runtime
    from runtime.generate import prefill

    device, dtype = spec["device"], torch_dtype(spec["dtype"])
    L, chunk, R = spec["context"], spec["chunk"], spec["compare_repeats"]
    folder = spec["model_dir"]
    rt = runtime.load_model(folder, device=device, dtype=dtype)
    hf = DeepseekV4ForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    res: dict = {"kind": "compare", "context": L, "chunk": chunk, "repeats": R,
                 "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None)}
    gen = torch.Generator().manual_seed(spec.get("seed", 0) + 7)
    ids = torch.randint(0, rt.config.vocab_size, (1, L), generator=gen).to(device)

    def timed(fn):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        return time.perf_counter() - t, out

    def rt_full():
        rt.attn_impl = "sparse"
        return rt(ids)

    def rt_eager():
        rt.attn_impl = "eager"
        try:
            return rt(ids)
        finally:
            rt.attn_impl = "sparse"

    def hf_full():
        return hf(ids, use_cache=False).logits

    def rt_chunked():  # the engine's prefill (runtime/generate.py)
        return prefill(rt, ids[0].tolist(), rt.new_cache(), chunk_size=chunk, trim=False)[None]

    def hf_chunked():
        cache = DynamicCache(config=hf.config)
        for s in range(0, L, chunk):
            out = hf(ids[:, s : s + chunk], cache=cache, use_cache=True, logits_to_keep=1).logits
        return out[:, -1]

    paths = {"runtime_full": rt_full, "hf_full": hf_full, "runtime_eager": rt_eager,
             "runtime_chunked": rt_chunked, "hf_chunked": hf_chunked}
    groups = []
    if L <= spec["full_max"]:
        groups.append(("full", ["runtime_full", "hf_full"] + (["runtime_eager"] if L <= spec["eager_max"] else [])))
    elif L <= spec["eager_max"]:
        groups.append(("full", ["runtime_full", "runtime_eager"]))
    if L <= spec["chunked_max"]:
        groups.append(("chunked", ["runtime_chunked", "hf_chunked"]))

    times: dict[str, list[float]] = {}
    peak: dict[str, int] = {}
    outs: dict = {}
    can_reset = reset_peak_rss()
    with torch.inference_mode():
        for group, names in groups:
            for r in range(R):
                order = names if r % 2 == 0 else list(reversed(names))
                for name in order:
                    _log(f"L={L} {name} repeat {r + 1}/{R}")
                    outs.pop(name, None)
                    if can_reset:
                        reset_peak_rss()
                    dt, out = timed(paths[name])
                    times.setdefault(name, []).append(dt)
                    if can_reset:
                        peak[name] = max(peak.get(name, 0), proc_status().get("VmHWM", 0))
                    outs[name] = out
            if group == "full":
                ref = outs.get("hf_full")
                if ref is not None:
                    res["err_full_all_positions"] = rel_err(outs["runtime_full"], ref)
                    res["err_full_last_position"] = rel_err(outs["runtime_full"][:, -1], ref[:, -1])
                    res["bad_full_all_positions"] = bad_positions(outs["runtime_full"], ref)
                    if "runtime_eager" in outs:
                        res["err_eager_vs_hf"] = rel_err(outs["runtime_eager"], ref)
                        res["bad_eager_vs_hf"] = bad_positions(outs["runtime_eager"], ref)
                if "runtime_eager" in outs:
                    res["err_sparse_vs_eager"] = rel_err(outs["runtime_full"], outs["runtime_eager"])
                    res["bad_sparse_vs_eager"] = bad_positions(outs["runtime_full"], outs["runtime_eager"])
                if ref is not None:
                    _log(f"L={L} selection check (tie-aware logits agreement)")
                    res["selection_check"] = selection_check(rt, hf, ids, rt.config, outs["runtime_full"], ref,
                                                             outs.get("runtime_eager"))
                for k in ("runtime_full", "hf_full", "runtime_eager"):
                    outs.pop(k, None)
            else:
                res["err_chunked_last_position"] = rel_err(outs["runtime_chunked"], outs["hf_chunked"])
    res["seconds"] = {k: statistics.median(v) for k, v in times.items()}
    res["seconds_runs"] = times
    res["peak_rss_by_path"] = peak if can_reset else None
    s = res["seconds"]
    ratios = {}
    for a, b in (("runtime_full", "hf_full"), ("runtime_chunked", "hf_chunked"), ("runtime_full", "runtime_eager")):
        if a in s and b in s:
            ratios[f"{a}/{b}"] = s[a] / s[b]
    res["ratios"] = ratios
    res["memory"] = {"rss": proc_status()}
    return res
