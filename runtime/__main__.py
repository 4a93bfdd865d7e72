"""`python -m runtime`: the headless command line over runtime/engine.py.

    ask --corpus PATH [PATH ...] --question TEXT [--model DIR] [--max-new-tokens N] [--snapshot-dir DIR] [--json]
    snapshot save --corpus PATH [PATH ...] [--snapshot-dir DIR] [--force]
    snapshot load PATH_OR_KEY [--snapshot-dir DIR] [--question TEXT]
    snapshot list [--snapshot-dir DIR]
    eval ...                      (runtime/evaluate.py)
    trace show FILE [--format auto|longlens|sglang] [--corpus PATH ...] [--model DIR] [--question TEXT]
               [--report FILE.html] [--trace FILE.json] [--trace-format longlens|sglang] [--figures DIR] [--json]
    plan --model DIR | --preset flash|pro --world-size N --gpu-memory 141GB [--context TOKENS] [--sessions K]
         [--dtype bfloat16|float32] [--index-dtype auto|bfloat16|float32] [--chunk-size N] [--check] [--json]

`ask` (and `snapshot load --question`) also take --report FILE.html (runtime/report.py: a self-contained
report), --trace FILE.json with --trace-format longlens|sglang (runtime/trace.py) and --figures DIR (the
report's figures as PNG and SVG, through kaleido + Chromium); the paths written appear in --json's object
as "report", "trace" and "figures". `trace show` reads a trace (Longlens JSON, a Longlens report, or an
SGLang /generate response with meta_info.indexer_topk) over the corpus it was made over and writes the same.

`ask --json` prints one object: {"answer", "sources": [{"file", "line_start", "line_end", "weight",
"layers", "snippet"}], "timings", "cache_bytes", "dense_cache_bytes"}; `file` is the path as given
(archive members: `archive.zip/inner/path`). Exit status: 0 done; 2 bad input (no such file,
unreadable, binary-only, malformed archive, corpus too large, bad arguments, a missing model or a
refused snapshot), with --json printed as {"error": "..."} on stdout; 1 anything else. Never a
traceback unless LONGLENS_DEBUG=1. Progress goes to stderr, and only when it is a terminal.

`ask --exclude FILE[:START-END] ... --include FILE[:START-END] ... --index-topk K` (counterfactual selection,
runtime/steering.py; FILE as the corpus names it: the path as given to --corpus, lines 1-based inclusive,
FILE alone = the whole document) answers as usual, then answers the same question again from the cache mark
with those spans forced out of / into every CSA layer's top-k (or its width changed); the window and HCA
paths are left as they are. The printed answer and "answer" / "sources" stay the unsteered ones; --json adds
"counterfactual": {"steering", "changed", "old_answer", "answer", "stop_reason", "sources", "selection",
"mass", "spans", ...} (Counterfactual.to_dict in runtime/session.py). Bad specs exit 2 before any prefill.

`plan` (runtime/plan.py) prints, per GPU, the weights as stored under the world size's sharding, each session's
cache by component, the workspace and whether the total fits --gpu-memory (G, GB and GiB all mean 2^30 bytes
here) -- and if not, how many sessions or how long a context would, and which world size. Only config.json is
read. It exits 0 either way; with --check, 1 when it does not fit. A world size that cannot split the model
exits 2 naming the constraint.
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
    p.add_argument("--device", default="auto", help="auto (CUDA when present; under torchrun each rank's GPU), cpu, cuda:1")
    _index_dtype_arg(p)
    p.add_argument("--chunk-size", type=_positive, default=2048, help="prefill chunk in tokens")
    p.add_argument("--max-context-tokens", type=_positive, default=None)
    p.add_argument("--memory-budget", type=_bytes, default=None, help="cache budget, e.g. 8G (default: 80%% of free)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _index_dtype_arg(p: argparse.ArgumentParser) -> None:
    from .isa import CHOICES

    p.add_argument("--index-dtype", choices=CHOICES, default="auto",
                   help="the lightning indexer's keys; auto = bfloat16 on CUDA and on CPUs that compute in bf16 "
                        "(AMX, AVX512-BF16), float32 elsewhere (runtime/isa.py)")
    p.add_argument("--prefill-dtype", choices=CHOICES + ("model",), default=None,
                   help="what prefill's HCA pass over the compressed entries computes in; auto = bfloat16 where "
                        "the CPU computes bf16 natively (AMX, AVX512-BF16), else the model's dtype; model = the "
                        "reference (default: $LONGLENS_PREFILL_DTYPE, else auto)")


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
    _export_args(ask)
    _steering_args(ask)

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

    _trace_parser(sub)
    _plan_parser(sub)

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
    engine = Engine.from_dir(model, dtype=getattr(torch, args.dtype), device=_device(args), chunk_size=args.chunk_size,
                             max_context_tokens=args.max_context_tokens, memory_budget_bytes=args.memory_budget,
                             index_dtype=args.index_dtype, prefill_dtype=args.prefill_dtype)
    return engine, time.perf_counter() - t0


def _device(args) -> str:
    from .parallel import init_from_env

    device = getattr(args, "device", "auto")
    return str(init_from_env(device)[1])  # auto: cuda (cuda:LOCAL_RANK under torchrun) when present, else cpu


def _follower(args) -> bool:
    """Under torchrun, ranks > 0 load their shard and replay rank 0's model operations here (printing
    nothing); True once rank 0 has finished. Rank 0 and single processes go on with the command."""
    import torch

    from .cluster import follow_if_follower

    # eval has no --device: it runs on the CPU, and so do its followers
    return follow_if_follower(args.model, getattr(args, "device", "cpu"),
                              getattr(torch, getattr(args, "dtype", "float32")),
                              prefill_dtype=getattr(args, "prefill_dtype", None))


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
    out.update(_export_answer(session, args, final))
    return out


def cmd_ask(args) -> dict:
    corpus, ingest_s = _ingest(args.corpus)
    _check_steering(args, corpus)
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
    out = _answer(session, args, {k: v for k, v in timings.items() if v is not None})
    if _steered(args):
        out["counterfactual"] = _counterfactual(session, args)
    return out


# ---------------------------------------------------------------------------------------- counterfactual selection
def _steering_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exclude", action="append", default=[], metavar="FILE[:START-END]",
                   help="also answer with these lines' compressed entries kept out of every CSA layer's top-k "
                        "(repeatable; FILE as given to --corpus)")
    p.add_argument("--include", action="append", default=[], metavar="FILE[:START-END]",
                   help="also answer with these lines' compressed entries forced into every CSA layer's top-k")
    p.add_argument("--index-topk", type=_positive, default=None, metavar="K",
                   help="also answer with the CSA top-k width set to K")


def _steered(args) -> bool:
    return bool(getattr(args, "exclude", None) or getattr(args, "include", None)
                or getattr(args, "index_topk", None) is not None)


def _check_steering(args, corpus) -> None:
    """Bad --exclude / --include specs fail here, before the prefill."""
    from .steering import check_specs, count_lines

    if _steered(args):
        check_specs(args.exclude + args.include, [(d.name, count_lines(d.text)) for d in corpus.documents])


def _counterfactual(session, args) -> dict:
    from .steering import SCOPE_NOTE

    cf = session.counterfactual(session.steering(args.exclude, args.include, args.index_topk), _params(args))
    out = cf.to_dict(args.top_sources)
    out["steering"].update(exclude_specs=list(args.exclude), include_specs=list(args.include))
    if not args.json:
        what = ", ".join([f"exclude {s}" for s in args.exclude] + [f"include {s}" for s in args.include]
                         + ([f"index_topk {args.index_topk}"] if args.index_topk is not None else []))
        print(f"\nCounterfactual ({what}): {'changed' if cf.changed else 'unchanged'}\n{cf.new.text}")
        for layer, d in cf.selection.items():
            print(f"  CSA layer {layer}: {len(d.dropped)} entries dropped (weight {d.dropped_weight:.3f} before), "
                  f"{len(d.added)} added (weight {d.added_weight:.3f} after), {d.kept} kept")
        for sw in cf.spans:
            before, after = sum(sw.csa_before.values()), sum(sw.csa_after.values())
            print(f"  {sw.kind} {sw.where or f'tokens {sw.token_start}-{sw.token_end}'}: CSA weight "
                  f"{before:.3f} -> {after:.3f}")
        print(f"  ({SCOPE_NOTE})")
    return out


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


# ---------------------------------------------------------------------------------------- traces and reports
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", metavar="FILE.html", default=None, help="write a self-contained HTML report")
    p.add_argument("--trace", metavar="FILE.json", default=None, help="write the answer's selection trace")
    p.add_argument("--trace-format", choices=("longlens", "sglang"), default="longlens",
                   help="--trace layout: Longlens JSON, or SGLang's indexer_topk response (ids only)")
    p.add_argument("--figures", metavar="DIR", default=None,
                   help="write the report's figures as PNG and SVG here (kaleido + Chromium)")


def _trace_parser(sub) -> None:
    tr = sub.add_parser("trace", help="show a saved trace (Longlens or SGLang) over its corpus")
    tsub = tr.add_subparsers(dest="action", required=True)
    show = tsub.add_parser("show", help="read a trace, check it against the corpus, write a report / trace")
    show.add_argument("file", help="a Longlens trace (.json), a Longlens report (.html) or an SGLang response")
    show.add_argument("--format", choices=("auto", "longlens", "sglang"), default="auto", help="the file's layout")
    show.add_argument("--corpus", nargs="+", default=None, metavar="PATH",
                      help="the corpus the trace was made over (sources, file:line; required for SGLang)")
    show.add_argument("--model", default=str(DEFAULT_MODEL),
                      help="the model folder whose config.json and tokenizer the trace used (no weights are loaded)")
    show.add_argument("--question", default=None, help="the question (an SGLang response does not carry it)")
    show.add_argument("--top-sources", type=_positive, default=5)
    show.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _export_args(show)


def _exports(args, trace, layout, prov) -> dict:
    """Write what --report / --trace / --figures ask for; their paths for the JSON output."""
    from .report import report_figures, write_figures, write_report
    from .trace import TraceError, write_trace

    out = {}
    try:
        if getattr(args, "trace", None):
            out["trace"] = str(write_trace(args.trace, trace, args.trace_format))
        if getattr(args, "report", None):
            out["report"] = str(write_report(args.report, trace, layout, provenance=prov))
    except TraceError as e:
        raise BadInput(str(e)) from None
    if getattr(args, "figures", None):
        paths = write_figures(args.figures, report_figures(prov, counts=not trace.weighted))
        out["figures"] = [str(p) for p in paths]
    if not args.json:
        for key in ("report", "trace"):
            if key in out:
                print(f"{key}: {out[key]}")
        if "figures" in out:
            print(f"figures: {', '.join(out['figures'])}")
    return out


def _export_answer(session, args, final) -> dict:
    if not any(getattr(args, k, None) for k in ("report", "trace", "figures")):
        return {}
    from .trace import Trace, TraceError

    try:
        trace = Trace.from_answer(final, args.question, session)
    except TraceError as e:
        raise BadInput(str(e)) from None
    return _exports(args, trace, session.layout, final.provenance)


def cmd_trace(args) -> dict:
    from .checkpoint import read_config
    from .config import ModelConfig
    from .corpus import Layout
    from .snapshot import corpus_fingerprint
    from .tokenizer import DEFAULT_PATH, Tokenizer
    from .trace import TraceError, read_trace

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise BadInput(f"no model config at {model / 'config.json'}; pass --model DIR (config.json + tokenizer.json)")
    config = ModelConfig.from_dict(read_config(model))
    tok = Tokenizer.from_file(model / "tokenizer.json" if (model / "tokenizer.json").is_file() else DEFAULT_PATH)
    preamble = [tok.bos_id, tok.user_id]  # what Engine.preamble puts before the corpus
    layout = None
    if args.corpus:
        corpus, _ = _ingest(args.corpus)
        layout = Layout.build(corpus, tok.encode_with_offsets)
    docs = [] if layout is None else [(d.name, d.token_start + len(preamble), d.token_end + len(preamble))
                                      for d in layout.documents]
    try:
        trace = read_trace(args.file, args.format, config=config, documents=docs, offset=len(preamble),
                           question=args.question or "", tokenizer=tok, model_name=model.name,
                           corpus=corpus_fingerprint(layout, preamble) if layout is not None else "")
        if args.question is not None:
            trace.question = args.question
        if trace.origin == "sglang" and layout is None:
            raise TraceError("an SGLang trace holds no corpus information: pass --corpus (the files it was made over)")
        prov = trace.to_provenance(layout)
    except (TraceError, OSError) as e:
        raise BadInput(f"{args.file}: {e}") from None
    if layout is not None:
        for m in trace.mismatches(corpus=corpus_fingerprint(layout, preamble)):
            print(f"warning: {m}", file=sys.stderr)
    out = {"file": args.file, "origin": trace.origin, "measure": "attention weight" if trace.weighted else "times picked",
           "question": trace.question, "answer": trace.answer, "answer_tokens": trace.n_tokens,
           "n_context": trace.n_context, "sources": [s.to_dict() for s in prov.sources[: args.top_sources]]}
    if not args.json:
        print(f"{args.file}: {trace.origin} trace, {trace.n_tokens} answer tokens over {trace.n_context:,} tokens "
              f"({out['measure']})")
        print(f"Q: {trace.question}\nA: {trace.answer}")
        for i, s in enumerate(prov.sources[: args.top_sources], 1):
            print(f"  {i}. {s.file}:{s.line_start}-{s.line_end}  {s.weight:.3f}  layers {','.join(map(str, s.layers))}")
    out.update(_exports(args, trace, layout, prov))
    return out


# ---------------------------------------------------------------------------------------- memory plan
def _plan_parser(sub) -> None:
    from .plan import DEFAULT_CHUNK, DTYPE_BYTES, PRESETS

    p = sub.add_parser("plan", help="will a model fit on N GPUs: weights, caches and workspace per GPU")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model folder (only its config.json is read)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a released DeepSeek-V4 config")
    p.add_argument("--world-size", type=_positive, default=1, help="GPUs in all (nodes x GPUs per node)")
    p.add_argument("--gpu-memory", type=_bytes, required=True, help="memory per GPU, e.g. 141GB (H200), 80GB (H100)")
    p.add_argument("--context", type=_positive, default=None,
                   help="tokens per session (default: the model's max_position_embeddings)")
    p.add_argument("--sessions", type=_positive, default=1, help="sessions held at once")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16",
                   help="cache, activations and the weights not stored quantised")
    p.add_argument("--index-dtype", choices=["auto"] + sorted(DTYPE_BYTES), default="auto",
                   help="the indexer's keys (auto: runtime/isa.py's choice on a GPU, bfloat16)")
    p.add_argument("--chunk-size", type=_positive, default=DEFAULT_CHUNK, help="prefill chunk in tokens")
    p.add_argument("--check", action="store_true", help="exit with status 1 when it does not fit")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def cmd_plan(args) -> dict:
    from .checkpoint import read_config
    from .config import ModelConfig
    from .plan import PRESETS, formats, plan, preset

    if args.preset:
        raw, name = preset(args.preset), PRESETS[args.preset]
    else:
        if not (Path(args.model) / "config.json").is_file():
            raise BadInput(f"no model config at {Path(args.model) / 'config.json'}; pass --model DIR or --preset")
        raw, name = read_config(args.model), Path(args.model).name
    from .isa import name as dtype_name, resolve

    linear, experts = formats(raw)
    p = plan(ModelConfig.from_dict(raw), args.world_size, args.gpu_memory, args.context, args.sessions, args.dtype,
             dtype_name(resolve(args.index_dtype, "cuda")), args.chunk_size, linear, experts, name)
    if not args.json:
        print(p.table())
    return p.to_dict()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    bad = (BadInput, CorpusError, EngineError, SnapshotError, CheckpointError, ConfigError, FileNotFoundError)
    try:
        with_eval = bool(argv) and argv[0] == "eval"
        args = build_parser(with_eval).parse_args(argv)
        if args.command in ("ask", "snapshot", "eval") and hasattr(args, "model") and _follower(args):
            return 0
        if args.command == "eval":
            return int(_evaluate().main_eval(args))
        out = {"ask": cmd_ask, "snapshot": cmd_snapshot, "trace": cmd_trace, "plan": cmd_plan}[args.command](args)
        if args.json:
            print(json.dumps(out, ensure_ascii=False))
        return 1 if args.command == "plan" and args.check and not out["fits"] else 0
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
