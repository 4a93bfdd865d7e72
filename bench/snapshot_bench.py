"""Snapshot reload vs prefill of a ~100k-token corpus (issue 4: reload must be >= 20x faster).

    python bench/snapshot_bench.py [--tokens 100000] [--model DIR | --config tiny5m] [--threads N]

The corpus is real text: CPython standard library files, taken in sorted order until the layout
reaches --tokens. The model is --model (e.g. assets/model) or a random one of a bench preset
(bench/configs.py), written to a temporary folder first so it is fingerprinted from its files as
in production. Three timings, each from a fresh Session of one Engine:
  prefill   load_corpus with an empty snapshot dir: ingest + tokenize + chunked prefill (+ save);
  reuse     load_corpus again: ingest + tokenize + fingerprint + load of the matching snapshot;
  load      Session.load_snapshot(path) alone: manifest, sha256 of the files, tensors into a cache.
The ratios are prefill-only / load and end-to-end prefill / reuse. The snapshot must give
bit-identical next-token logits (checked). A card goes to stdout, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `runtime` and `bench` importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.configs import DEFAULT_PRESET, PRESETS, preset  # noqa: E402
from runtime.config import ModelConfig  # noqa: E402
from runtime.corpus import Layout, ingest  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.model import Transformer  # noqa: E402
from runtime.tokenizer import DEFAULT_PATH as TOKENIZER, Tokenizer  # noqa: E402

BYTES_PER_TOKEN = 3.0  # rough, for picking files; the layout's real count decides


def random_model_dir(name: str, folder: Path, seed: int = 0) -> Path:
    cfg = preset(name)
    model = Transformer(ModelConfig.from_dict(cfg)).init_weights(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v4"}))
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    return folder


def stdlib_files(tokens: int, tokenizer: Tokenizer) -> list[str]:
    """Sorted stdlib .py files whose layout holds at least `tokens` tokens."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    picked, size = [], 0
    for p in files:
        picked.append(str(p))
        size += p.stat().st_size
        if size >= tokens * BYTES_PER_TOKEN:
            n = len(Layout.build(ingest(picked), tokenizer.encode_with_offsets).ids)
            if n >= tokens:
                return picked
    raise SystemExit(f"the standard library at {root} holds fewer than {tokens:,} tokens")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--model", default=None, help="model folder (default: a random --config model)")
    ap.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="snapshot-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else random_model_dir(args.config, tmp / "model")
        engine = Engine.from_dir(model_dir, dtype=getattr(torch, args.dtype), chunk_size=args.chunk_size)
        files = stdlib_files(args.tokens, engine.tokenizer)
        snaps = tmp / "snapshots"

        first = engine.new_session()
        prefill = first.load_corpus(files, snapshot_dir=snaps)
        assert prefill.source == "prefill" and prefill.snapshot is not None, prefill.warnings
        second = engine.new_session()
        reuse = second.load_corpus(files, snapshot_dir=snaps)
        assert reuse.source == "snapshot", reuse.warnings
        third = engine.new_session()
        t0 = time.perf_counter()
        third.load_snapshot(prefill.snapshot)
        load_s = time.perf_counter() - t0
        identical = torch.equal(first.last_logits, second.last_logits) and torch.equal(first.last_logits,
                                                                                      third.last_logits)
        snap_bytes = sum(f.stat().st_size for f in prefill.snapshot.iterdir())

    p, r = prefill.timings, reuse.timings
    result = {
        "model": str(args.model or f"random {args.config}"), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "files": len(files), "tokens": prefill.tokens, "chunk_size": args.chunk_size,
        "prefill_s": p["prefill_s"], "prefill_tokens_per_s": p["prefill_tokens_per_s"], "layer_s": p["layer_s"],
        "prefill_total_s": p["total_s"], "snapshot_save_s": p["snapshot_save_s"], "snapshot_bytes": snap_bytes,
        "cache_bytes": first.cache_bytes()["total"], "dense_cache_bytes": first.dense_cache_bytes(),
        "load_s": load_s, "reuse_total_s": r["total_s"], "reuse_load_s": r["snapshot_load_s"],
        "ingest_tokenize_s": r["ingest_s"] + r["tokenize_s"],
        "ratio_prefill_vs_load": p["prefill_s"] / load_s,
        "ratio_end_to_end": p["total_s"] / r["total_s"], "identical_logits": identical,
    }
    print(f"corpus      {result['files']} stdlib files, {result['tokens']:,} tokens "
          f"({result['model']}, {args.dtype}, {result['threads']} threads)")
    print(f"prefill     {result['prefill_s']:.2f} s ({result['prefill_tokens_per_s']:,.0f} tok/s; by layer kind "
          + ", ".join(f"{k} {v:.2f} s" for k, v in result["layer_s"].items()) + ")")
    print(f"snapshot    {snap_bytes / 2**20:.2f} MiB written in {result['snapshot_save_s']:.3f} s "
          f"(cache {result['cache_bytes'] / 2**20:.2f} MiB, dense equivalent {result['dense_cache_bytes'] / 2**20:.1f} MiB)")
    print(f"load        {load_s:.3f} s  -> {result['ratio_prefill_vs_load']:,.0f}x faster than the prefill")
    print(f"end to end  {result['prefill_total_s']:.2f} s with prefill vs {result['reuse_total_s']:.3f} s reusing "
          f"(ingest + tokenize {result['ingest_tokenize_s']:.3f} s) -> {result['ratio_end_to_end']:,.0f}x")
    print(f"logits      {'bit-identical' if identical else 'DIFFERENT'} after reload")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))
    return 0 if identical and result["ratio_prefill_vs_load"] >= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
