"""`python -m runtime`: the headless command line over runtime/engine.py.

    ask --corpus PATH [PATH ...] --question TEXT [--model DIR] [--max-new-tokens N] [--snapshot-dir DIR] [--json]
    snapshot save --corpus PATH [PATH ...] [--snapshot-dir DIR] [--force]
    snapshot load PATH_OR_KEY [--snapshot-dir DIR] [--question TEXT]
    snapshot list [--snapshot-dir DIR]
    eval ...                      (runtime/evaluate.py)

`ask --json` prints one object: {"answer", "sources": [{"file", "line_start", "line_end", "weight",
"layers", "snippet"}], "timings", "cache_bytes", "dense_cache_bytes"}; `file` is the path as given
(archive members: `archive.zip/inner/path`). Exit status: 0 done; 2 bad input (no such file,
unreadable, binary-only, malformed archive, corpus too large, bad arguments, a missing model or a
refused snapshot), with --json printed as {"error": "..."} on stdout; 1 anything else. Never a
traceback unless LONGLENS_DEBUG=1. Progress goes to stderr, and only when it is a terminal.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError
from .corpus import CorpusError
from .engine import EngineError
from .snapshot import SnapshotError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "assets" / "model"
DEFAULT_SNAPSHOTS = Path(os.environ.get("LONGLENS_SNAPSHOT_DIR", Path.home() / ".cache" / "longlens" / "snapshots"))


class BadInput(Exception):
    """Exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we answer in the chosen format
        raise BadInput(f"{self.prog}: {message}")


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 8G, 512M, 1000000)") from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (config.json + *.safetensors)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--chunk-size", type=_positive, default=2048, help="prefill chunk in tokens")
    p.add_argument("--max-context-tokens", type=_positive, default=None)
    p.add_argument("--memory-budget", type=_bytes, default=None, help="cache budget, e.g. 8G (default: 80%% of free)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _answer_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--question", required=required)
    p.add_argument("--max-new-tokens", type=_positive, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--top-sources", type=_positive, default=5)


def build_parser(with_eval: bool) -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m runtime", description="Longlens: ask questions about huge corpora.")
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="answer a question about a corpus, with sources")
    ask.add_argument("--corpus", nargs="+", required=True, metavar="PATH", help="files, folders, zip/tar archives")
    ask.add_argument("--snapshot-dir", default=None, help="reuse/save snapshots of this corpus here")
    _answer_args(ask, required=True)
    _model_args(ask)

    snap = sub.add_parser("snapshot", help="save, load or list corpus snapshots")
    ssub = snap.add_subparsers(dest="action", required=True)
    save = ssub.add_parser("save", help="prefill a corpus and save its snapshot")
    save.add_argument("--corpus", nargs="+", required=True, metavar="PATH")
    save.add_argument("--force", action="store_true", help="prefill and write even if a snapshot exists")
    load = ssub.add_parser("load", help="load (and check) a snapshot; optionally ask a question")
    load.add_argument("snapshot", help="a snapshot folder, or a key in --snapshot-dir")
    _answer_args(load, required=False)
    lst = ssub.add_parser("list", help="list snapshots")
    lst.add_argument("--json", action="store_true")
    for p in (save, load, lst):
        p.add_argument("--snapshot-dir", default=str(DEFAULT_SNAPSHOTS))
    for p in (save, load):
        _model_args(p)

    ev = sub.add_parser("eval", help="evaluate the model (runtime/evaluate.py)")
    if with_eval:
        _evaluate().add_eval_arguments(ev)
    return parser


def _evaluate():
    try:
        return importlib.import_module("runtime.evaluate")
    except ModuleNotFoundError as e:
        if e.name != "runtime.evaluate":
            raise
        raise RuntimeError("the eval commands are not available: runtime/evaluate.py is missing from this "
                           "checkout") from None


# ---------------------------------------------------------------------------------------- commands
def _engine(args):
    import torch

    from .engine import Engine

    model = Path(args.model)
    if not model.is_dir():
        hint = " (the default model is not in this checkout yet)" if model == DEFAULT_MODEL else ""
        raise BadInput(f"no model folder at {model}{hint}; pass --model DIR")
    t0 = time.perf_counter()
    engine = Engine.from_dir(model, dtype=getattr(torch, args.dtype), chunk_size=args.chunk_size,
                             max_context_tokens=args.max_context_tokens, memory_budget_bytes=args.memory_budget)
    return engine, time.perf_counter() - t0


def _progress(args):
    if not sys.stderr.isatty():
        return None

    def show(p):
        end = "\n" if p.done == p.total else ""
        print(f"\rprefill {p.done:,}/{p.total:,} tokens ({p.done / p.total:.0%}), {p.tokens_per_s:,.0f} tok/s, "
              f"ETA {p.eta_s:,.0f} s   ", end=end, file=sys.stderr, flush=True)
    return show


def _ingest(paths):
    from .corpus import ingest

    t0 = time.perf_counter()
    corpus = ingest(paths)
    for s in corpus.skipped:
        print(f"skipped {s.name}: {s.reason}", file=sys.stderr)
    return corpus, time.perf_counter() - t0


def _params(args):
    from .engine import GenerationParams

    return GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)


def _rounded(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else _rounded(v) if isinstance(v, dict) else v)
            for k, v in d.items()}


def _answer(session, args, timings: dict) -> dict:
    from .engine import Answer

    final = None
    for ev in session.ask(args.question, _params(args)):
        if isinstance(ev, Answer):
            final = ev
        elif not args.json:
            print(ev.text, end="", flush=True)
    timings.update({k: v for k, v in final.timings.items() if k != "context_tokens"})
    sources = [] if final.provenance is None else final.provenance.sources[: args.top_sources]
    out = {"answer": final.text, "sources": [s.to_dict() for s in sources], "timings": _rounded(timings),
           "cache_bytes": session.cache_bytes(), "dense_cache_bytes": session.dense_cache_bytes()}
    if not args.json:
        print(f"\n\n[{final.stop_reason}; {final.timings['decode_tokens']} tokens at "
              f"{final.timings['decode_tokens_per_s']:.1f} tok/s; question prefill "
              f"{final.timings['prefill_tokens']} tokens]")
        print("Sources:" if sources else "Sources: none recorded")
        for i, s in enumerate(sources, 1):
            first = s.snippet.splitlines()[0] if s.snippet else ""
            print(f"  {i}. {s.file}:{s.line_start}-{s.line_end}  weight {s.weight:.3f}  layers "
                  f"{','.join(map(str, s.layers))}\n     {first[:100]}")
    return out


def cmd_ask(args) -> dict:
    corpus, ingest_s = _ingest(args.corpus)
    engine, model_s = _engine(args)
    session = engine.new_session()
    report = session.load_corpus(corpus, progress=_progress(args), snapshot_dir=args.snapshot_dir)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    t = report.timings
    timings = {"model_load_s": model_s, "ingest_s": ingest_s, "tokenize_s": t["tokenize_s"],
               "corpus_tokens": report.tokens, "corpus_source": report.source,
               "corpus_prefill_tokens": t.get("prefill_tokens", 0), "corpus_prefill_s": t.get("prefill_s", 0.0),
               "snapshot_load_s": t.get("snapshot_load_s"), "snapshot_save_s": t.get("snapshot_save_s"),
               "layer_s": t.get("layer_s", {})}
    return _answer(session, args, {k: v for k, v in timings.items() if v is not None})


def cmd_snapshot(args) -> dict:
    from .snapshot import list_snapshots

    if args.action == "list":
        snaps = list_snapshots(args.snapshot_dir)
        if not args.json:
            if not snaps:
                print(f"no snapshots in {args.snapshot_dir}")
            for s in snaps:
                what = (f"{s.tokens:,} tokens, {s.documents} documents ({', '.join(s.names[:3])}"
                        f"{', …' if s.documents > 3 else ''}), {s.bytes / 2**20:.1f} MiB, {s.created}"
                        + (f", {s.chat_tokens:,} chat tokens" if s.chat_tokens else "")
                        if s.complete else f"unusable: {s.problem}")
                print(f"{s.key}  {what}")
        return {"snapshots": [{"key": s.key, "path": str(s.path), "complete": s.complete, "problem": s.problem,
                               "created": s.created, "tokens": s.tokens, "chat_tokens": s.chat_tokens,
                               "documents": s.documents, "names": list(s.names), "bytes": s.bytes} for s in snaps]}
    if args.action == "save":
        corpus, ingest_s = _ingest(args.corpus)
        engine, _ = _engine(args)
        session = engine.new_session()
        if args.force:
            report = session.load_corpus(corpus, progress=_progress(args))
            report.snapshot = session.save_snapshot(args.snapshot_dir, overwrite=True)
        else:
            report = session.load_corpus(corpus, progress=_progress(args), snapshot_dir=args.snapshot_dir)
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if report.snapshot is None:
            raise RuntimeError("; ".join(report.warnings) or "the snapshot was not saved")
        out = {"snapshot": str(report.snapshot), "key": report.snapshot.name, "tokens": report.tokens,
               "documents": report.documents, "reused": report.source == "snapshot",
               "timings": _rounded({"ingest_s": ingest_s, **report.timings})}
        if not args.json:
            print(f"{'reused' if out['reused'] else 'saved'} {out['snapshot']} ({out['tokens']:,} tokens, "
                  f"{out['documents']} documents)")
        return out
    # load
    engine, _ = _engine(args)
    path = Path(args.snapshot)
    if not path.is_dir():
        path = Path(args.snapshot_dir) / args.snapshot
    session = engine.new_session()
    report = session.load_snapshot(path)
    out = {"snapshot": str(path), "tokens": report.tokens, "documents": report.documents,
           "chat_tokens": len(session.chat_ids), "timings": _rounded(report.timings),
           "cache_bytes": session.cache_bytes(), "dense_cache_bytes": session.dense_cache_bytes()}
    if not args.json:
        print(f"loaded {path}: {report.tokens:,} tokens, {report.documents} documents in "
              f"{report.timings['snapshot_load_s']:.3f} s")
    if args.question:
        out.update(_answer(session, args, {"snapshot_load_s": report.timings["snapshot_load_s"]}))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    bad = (BadInput, CorpusError, EngineError, SnapshotError, CheckpointError, ConfigError, FileNotFoundError)
    try:
        with_eval = bool(argv) and argv[0] == "eval"
        args = build_parser(with_eval).parse_args(argv)
        if args.command == "eval":
            return int(_evaluate().main_eval(args))
        out = cmd_ask(args) if args.command == "ask" else cmd_snapshot(args)
        if args.json:
            print(json.dumps(out, ensure_ascii=False))
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        code = 2 if isinstance(e, bad) else 1
        if os.environ.get("LONGLENS_DEBUG"):
            traceback.print_exc()
        msg = str(e) or type(e).__name__
        if as_json:  # the runtime's errors carry a stable code (runtime/errors.py)
            print(json.dumps({"error": msg, "code": getattr(e, "code", "internal" if code == 1 else "bad_request")},
                             ensure_ascii=False))
        else:
            print(f"error: {msg}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
