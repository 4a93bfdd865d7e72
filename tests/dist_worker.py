"""Run by tests/test_parallel.py, once as one plain process and once under torchrun with N gloo ranks:
loads a checkpoint through the public API (`runtime.load_model` gives this rank's shard once the process
group is up), prefills random ids in chunks and decodes a few greedy tokens, capturing every layer, and
writes what it saw (logits, CSA selections, captured weights) to `<out>.<rank>.pt`. Not a test module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import Capture, load_model  # noqa: E402
from runtime.parallel import init_from_env  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--decode", type=int, default=3)
    p.add_argument("--quantized", default="keep")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--die-after", type=int, default=0, help="rank 1 vanishes after this many operations")
    p.add_argument("--engine", help="a corpus folder: run the session scenario (engine_scenario) over it")
    p.add_argument("--idle", action="store_true", help="with --die-after: rank 0 sends nothing after that; only "
                                                      "its heartbeat can find out")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.die_after:
        return vanishing_follower(args)
    if args.engine:
        return engine_scenario(args)
    shard, device = init_from_env("cpu")
    model = load_model(args.model, device, getattr(torch, args.dtype), quantized=args.quantized)
    ids = torch.randint(model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    cache, cap = model.new_cache(index_dtype=torch.float32), Capture()
    logits = []
    with torch.no_grad():
        for chunk in ids.split(args.chunk, dim=1):
            logits.append(model(chunk, cache, capture=cap))
        for _ in range(args.decode):
            nxt = logits[-1][:, -1:].argmax(-1)
            logits.append(model(nxt, cache, capture=cap))
    records = {}
    for layer in cap.layers:
        r = cap.record(layer)
        records[layer] = {k: getattr(r, k) for k in ("positions", "mass", "selected", "scores", "weights")}
    buffers = {n: b.dtype for n, b in model.named_buffers()}
    torch.save({"logits": torch.cat(logits, dim=1), "records": records, "world": shard.world,
                "weight_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
                "expert_bytes": sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                                    if ".ffn.experts." in n),
                "dtypes": {str(d) for d in buffers.values()} | {str(p.dtype) for p in model.parameters()}},
               f"{args.out}.{shard.rank}.pt")


def engine_scenario(args) -> None:
    """Rank 0 drives sessions through the engine as the app does (the other ranks follow): a corpus, two
    questions, a counterfactual (checkpoint, rewind, steered run, restore), undo, a second session, a snapshot
    saved and loaded into a third (adopted by every rank), and sessions dropped (their caches freed)."""
    import gc
    import json

    import runtime
    from runtime import Answer, Engine, GenerationParams

    if runtime.follow_if_follower(args.model, "cpu", torch.float32):
        return
    engine = Engine.from_dir(args.model, chunk_size=64)
    params = GenerationParams(max_new_tokens=6)
    out = {}

    def ask(session, q):
        final = [ev for ev in session.ask(q, params) if isinstance(ev, Answer)][-1]
        srcs = [] if final.provenance is None else final.provenance.sources[:5]
        return {"ids": final.token_ids, "sources": [(x.file, x.line_start, x.line_end, round(x.weight, 5))
                                                    for x in srcs]}

    s1 = engine.new_session()
    s1.load_corpus(sorted(Path(args.engine).iterdir()))
    out["a1"] = ask(s1, "What is the secret launch code?")
    out["a2"] = ask(s1, "Where is the river?")
    cf = s1.counterfactual(s1.steering(exclude=[s1.docs()[1][0]]), params)
    out["cf"] = {"old": cf.old.token_ids, "new": cf.new.token_ids}
    out["after_cf"] = ask(s1, "And the stone?")
    s1.undo_turn()
    out["after_undo"] = ask(s1, "And the stone?")
    s2 = engine.new_session()
    s2.load_corpus(sorted(Path(args.engine).iterdir()))
    out["s2"] = ask(s2, "What is the secret launch code?")
    snap = s1.save_snapshot(Path(args.out).parent / "snaps")
    del s2
    gc.collect()  # s2's cache is freed on every rank with the next operation
    s3 = engine.new_session()
    s3.load_snapshot(snap)
    out["s3"] = ask(s3, "And the apple?")
    out["s1"] = ask(s1, "And the apple?")
    Path(f"{args.out}.0.json").write_text(json.dumps(out))
    engine.model.close() if hasattr(engine.model, "close") else None


def vanishing_follower(args) -> None:
    """Rank 1 follows for a few operations, then its process ends without a word (as if killed); rank 0 must
    notice, fail the call with RankFailed, call on_failure, and not hang."""
    import os
    import time

    import runtime.cluster as cluster

    shard, device = cluster.connect("cpu")
    model = load_model(args.model, device)
    if shard.rank:
        count = 0
        real_send = cluster._send

        def send(message):
            nonlocal count
            count += 1
            if count > args.die_after:
                os._exit(0)  # exit status 0: torchrun leaves rank 0 running, so rank 0 must find out itself
            return real_send(message)
        cluster._send = send
        cluster.follow(model)
        return
    failures = []
    cluster.HEARTBEAT_S = 0.5
    leader = cluster.Leader(model, on_failure=failures.append)
    cache = leader.new_cache()
    t0, outcome = time.monotonic(), "no failure seen"
    try:
        for _ in range(1 if args.idle else 50):
            leader(torch.tensor([[1, 2, 3]]), cache)
        while args.idle and not failures and time.monotonic() - t0 < 60:
            time.sleep(0.1)  # idle: no request comes; the heartbeat must notice the dead rank
        if failures:
            leader(torch.tensor([[4]]), cache)  # a request after the failure is refused at once
    except cluster.RankFailed as e:
        outcome = f"RankFailed code={e.code}"
    with open(f"{args.out}.0.txt", "w") as f:
        f.write(f"{outcome}\nfailures={len(failures)}\nseconds={time.monotonic() - t0:.1f}\n")
    os._exit(0)


if __name__ == "__main__":
    main()
