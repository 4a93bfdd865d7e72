"""Start the Longlens app: `python launch.py [--model DIR] [--share --auth USER:PASS] ...`.

With no arguments it serves the small DeepSeek-V4 model shipped in assets/model on
http://127.0.0.1:7860, on the CPU (CUDA when present).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent


def parse_size(text: str) -> int:
    """'50mb', '2GB', '1048576' -> bytes."""
    t = text.strip().lower().replace(" ", "")
    for suffix, mult in (("gb", 1 << 30), ("mb", 1 << 20), ("kb", 1 << 10), ("b", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def parse_auth(values: list[str]) -> list[tuple[str, str]]:
    """USER:PASS pairs, or paths of files holding one USER:PASS per line."""
    pairs = []
    for v in values:
        lines = Path(v).read_text().splitlines() if Path(v).is_file() else [v]
        for line in (x.strip() for x in lines):
            if not line or line.startswith("#"):
                continue
            user, sep, pw = line.partition(":")
            if not sep or not user or not pw:
                raise SystemExit(f"--auth: expected USER:PASS, got {line!r}")
            pairs.append((user, pw))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Longlens: explore huge contexts with DeepSeek-V4's sparse attention.")
    p.add_argument("--model", default=str(ROOT / "assets" / "model"),
                   help="checkpoint folder (config.json + safetensors); default: the shipped small model")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights and activations; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--index-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="the lightning indexer's keys; auto = bfloat16 on CUDA and on CPUs that compute in bf16 "
                        "(AMX, AVX512-BF16), float32 elsewhere (runtime/isa.py)")
    p.add_argument("--prefill-dtype", default=None, choices=["auto", "bfloat16", "float32", "model"],
                   help="what prefill's HCA pass over the compressed entries computes in; auto = bfloat16 where "
                        "the CPU computes bf16 natively (AMX, AVX512-BF16), else the model's dtype; model = the "
                        "reference (default: $LONGLENS_PREFILL_DTYPE, else auto)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for the LAN)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also serve through a public Gradio share link")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASS",
                   help="require a login (repeatable; or a file with one USER:PASS per line)")
    p.add_argument("--max-file-size", default="50mb", help="largest single upload (e.g. 50mb)")
    p.add_argument("--max-files", type=int, default=2000, help="most files per upload")
    p.add_argument("--max-context", type=int, default=None,
                   help="most tokens per session (default: the model's max_position_embeddings)")
    p.add_argument("--max-sessions", type=int, default=8,
                   help="sessions kept in memory; the least recently used idle one is snapshotted and evicted")
    p.add_argument("--snapshot-dir", default=str(ROOT / "runs" / "snapshots"),
                   help="where corpus snapshots are saved and reused")
    p.add_argument("--concurrency", type=int, default=1, help="model jobs run at once (others queue)")
    return p


def refuse_plan_that_cannot_fit(settings) -> None:
    """Under torchrun on GPUs: every rank checks the memory plan (weights, one session at the full context,
    workspace) against its GPU before loading anything, and exits with the plan's table if it cannot fit."""
    from runtime.parallel import under_torchrun

    if not under_torchrun() or not settings.resolved_device().startswith("cuda"):
        return
    import torch

    from runtime.isa import name
    from runtime.plan import DoesNotFit, plan_or_refuse

    local = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        plan_or_refuse(settings.model_dir, int(os.environ["WORLD_SIZE"]),
                       torch.cuda.get_device_properties(local).total_memory, context=settings.max_context,
                       dtype="bfloat16" if settings.resolved_dtype() == torch.bfloat16 else "float32",
                       index_dtype=name(settings.resolved_index_dtype()))
    except DoesNotFit as e:
        raise SystemExit(f"Longlens: this model does not fit these GPUs:\n{e.table}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    auth = parse_auth(args.auth)
    if args.share and not auth:
        print("WARNING: --share without --auth: anyone with the link can use this app and its compute.",
              file=sys.stderr)

    from app import Settings, build_demo
    from app.sessions import malloc_defaults

    malloc_defaults()  # glibc's own trimming while idle; prefills tune it for themselves (large_allocations)

    settings = Settings(
        model_dir=args.model, device=args.device, dtype=args.dtype, index_dtype=args.index_dtype,
        prefill_dtype=args.prefill_dtype,
        max_file_bytes=parse_size(args.max_file_size),
        max_files=args.max_files, max_context=args.max_context, max_sessions=args.max_sessions,
        snapshot_dir=args.snapshot_dir, concurrency=args.concurrency)
    import runtime

    refuse_plan_that_cannot_fit(settings)
    # Under torchrun every rank loads its shard; ranks > 0 follow rank 0's model operations until it stops.
    if runtime.follow_if_follower(settings.model_dir, settings.device, settings.resolved_dtype(),
                                  prefill_dtype=settings.prefill_dtype):
        return 0
    demo, launch_kwargs = build_demo(settings)
    from runtime.isa import explain

    print(f"Longlens: model {args.model} on {settings.resolved_device()}, indexer keys "
          f"{explain(settings.index_dtype, settings.resolved_device())}", flush=True)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    _, local_url, share_url = demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth or None,
        max_file_size=settings.max_file_bytes, prevent_thread_lock=True, quiet=True, **launch_kwargs)
    print(f"Local URL: {local_url}", flush=True)
    if args.share:
        print(f"Share URL: {share_url}" if share_url else
              "Could not create a share link (no internet?); serving locally only.", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
