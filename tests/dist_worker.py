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
    args = p.parse_args()
    torch.set_num_threads(1)
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
                "dtypes": {str(d) for d in buffers.values()} | {str(p.dtype) for p in model.parameters()}},
               f"{args.out}.{shard.rank}.pt")


if __name__ == "__main__":
    main()
