"""The same model on CUDA and on the CPU: logits and CSA selections over one long prompt, prefill then decode.

    python bench/cuda_parity.py [--model assets/model] [--tokens 16384] [--decode 16]

Prints the largest logit difference (relative to the logits' scale), next-token agreement, the share of
decode-step CSA selections that agree, and both devices' prefill time; one JSON line. Needs a GPU."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import runtime  # noqa: E402
from runtime.generate import decode_one_token, prefill  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402


@torch.no_grad()
def run(model, ids, decode: int, device):
    cache, cap = model.new_cache(), runtime.Capture()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ids = ids[0].tolist()
    n = len(ids) - decode
    sync(); t = time.perf_counter()
    outs = [prefill(model, ids[:n], cache, chunk_size=n)]  # one forward, as before
    sync(); secs = time.perf_counter() - t
    for i in range(n, len(ids)):  # teacher-forced decode, selections captured
        outs.append(decode_one_token(model, ids[i], cache, cap))
    logits = torch.stack(outs)[None].float().cpu()  # [1, decode + 1, vocab]
    sel = {l: cap.record(l).selected.cpu() for l in cap.layers if cap.record(l).selected is not None}
    return logits, sel, secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "assets" / "model"))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU")
    args = ap.parse_args(argv)
    tok = Tokenizer.from_file(Path(args.model) / "tokenizer.json")
    text = "\n\n".join(p.read_text() for p in sorted((Path(__file__).resolve().parent.parent / "assets" / "examples").iterdir()))
    ids = tok.encode(text)
    ids = torch.tensor((ids * (args.tokens // len(ids) + 1))[: args.tokens])[None]
    ref, ref_sel, cpu_s = run(runtime.load_model(args.model), ids, args.decode, "cpu")
    out, sel, dev_s = run(runtime.load_model(args.model, device=args.device), ids, args.decode, args.device)
    # the same set of entries (order within a top-k is not part of the selection)
    agree = [(sel[l].sort(-1).values == ref_sel[l].sort(-1).values).all(-1).float().mean().item() for l in ref_sel]
    rec = {"tokens": args.tokens, "device": args.device,
           "max_abs_diff_rel": ((out - ref).abs().max() / ref.abs().max()).item(),
           "next_token_agree": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
           "csa_selection_agree": min(agree) if agree else None, "prefill_s_cpu": round(cpu_s, 2),
           f"prefill_s_{args.device}": round(dev_s, 3)}
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
