"""`python -m bench`: speed, memory, cost growth and reference comparisons per context length.

Examples:
    python -m bench --contexts 4096,32768                    # the default model (or the tiny5m preset)
    python -m bench --contexts 4096,32768 --compare --profile --write-md
    python -m bench --contexts 4096,32768,131072,262144,1048576 --write-md   # the scale targets (quiet machine!)
    python -m bench --device cuda --dtype bfloat16 --config flash-width --contexts 4096,32768,131072
    python -m bench --report bench/results/a.json bench/results/b.json --write-md   # re-render, no run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime import isa
from runtime.config import CSA, HCA, SLIDING

from . import configs, report
from .machine import copy_bandwidth, machine_info, matmul_peak, meminfo, small_op_latency

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = ROOT / "assets" / "model"
RESULTS = Path(__file__).resolve().parent / "results"
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def _ints(s: str) -> list[int]:
    out = []
    for x in s.split(","):
        x = x.strip().lower().replace("_", "")
        if not x:
            continue
        mult = 1
        if x.endswith("k"):
            mult, x = 1024, x[:-1]
        elif x.endswith("m"):
            mult, x = 1048576, x[:-1]
        out.append(int(x) * mult)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=_ints, default=_ints("4096,32768,131072,262144,1048576"),
                   help="context lengths (comma list; 4k/1M suffixes ok)")
    p.add_argument("--model", help=f"checkpoint folder (default: {DEFAULT_MODEL_DIR.relative_to(ROOT)} if it exists,"
                                   " else the --config preset)")
    p.add_argument("--config", choices=sorted(configs.PRESETS),
                   help=f"preset with random weights (default when no model folder: {configs.DEFAULT_PRESET})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset config key (JSON value)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--index-dtype", default="auto", choices=["auto", "bfloat16", "float32", "model"],
                   help="lightning-indexer key cache (runtime.Cache index_dtype): auto = the app engine's choice for"
                        " this CPU or device (runtime/isa.py: bfloat16 where bf16 is native, else float32; default),"
                        " or a dtype, or the model's dtype")
    p.add_argument("--prefill-dtype", default="auto", choices=["auto", "bfloat16", "float32", "model"],
                   help="what prefill's HCA dense pass computes in (runtime.load_model prefill_dtype): auto = the"
                        " app's choice (bfloat16 where the CPU computes bf16 natively, else the model's dtype)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPUs)")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens per model call)")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps after each prefill (>= 32)")
    p.add_argument("--decode-ref-context", type=int, default=4096,
                   help="each worker also decodes a cache of this length, step for step alternating with the long"
                        " one, so decode(L)/decode(ref) is a same-process ratio (0: off)")
    p.add_argument("--repeats", type=int, default=3, help="prefill+decode repeats per length (median)")
    p.add_argument("--single-repeat-above", type=int, default=131072,
                   help="lengths above this run once (a 1M prefill repeated 3x is not worth it)")
    p.add_argument("--no-split", action="store_true", help="no per-layer-type timers")
    p.add_argument("--profile", nargs="?", const="auto", default=None,
                   help="torch.profiler top ops of one more prefill chunk and 16 decode steps; optional comma list"
                        " of lengths (default: every length <= 32768)")
    p.add_argument("--compare", action="store_true",
                   help="also run transformers DeepseekV4ForCausalLM and the runtime's eager path on the same weights")
    p.add_argument("--compare-contexts", type=_ints, default=None,
                   help="lengths for --compare (default: the --contexts <= --hf-chunked-max)")
    p.add_argument("--compare-repeats", type=int, default=2)
    p.add_argument("--hf-full-max", type=int, default=4096, help="largest length for transformers' full forward")
    p.add_argument("--hf-chunked-max", type=int, default=32768, help="largest length for transformers' chunked path")
    p.add_argument("--eager-max", type=int, default=4096, help="largest length for the runtime's eager path")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="address-space limit per worker (default: 90%% of MemAvailable at start)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker before it is killed")
    p.add_argument("--no-malloc-env", action="store_true",
                   help="do not set MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e11 in workers (the app sets them around each prefill)")
    p.add_argument("--peak-n", type=int, default=2048, help="matmul size for the peak measurement")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the result set as JSON to PATH (or stdout with no PATH, tables then go to stderr)")
    p.add_argument("--write-md", nargs="?", const="BENCHMARKS.md", default=None, metavar="PATH",
                   help="render BENCHMARKS.md (and bench/results/benchmarks.svg + .json) from this run and --include,"
                        " the newest set of each kind (this run replaces the section of its own kind)")
    p.add_argument("--results-dir", default=str(RESULTS),
                   help="where --write-md puts benchmarks.svg and benchmarks.json (default: bench/results)")
    p.add_argument("--include", nargs="*", default=[], metavar="JSON",
                   help="earlier result sets to render with this one (--write-md; default: those in"
                        " <results-dir>/benchmarks.json, the sets already on the page)")
    p.add_argument("--report", nargs="+", metavar="JSON", help="render these result sets only; run nothing")
    p.add_argument("--label", help="a name for this result set in BENCHMARKS.md")
    p.add_argument("--note", help="a sentence printed under this result set in BENCHMARKS.md")
    return p


def prefill_dtype_name(args) -> str:
    """prefill's HCA pass dtype by name as runtime.load_model resolves it: "bfloat16", "float32" or "model"."""
    import torch

    return isa.name(isa.resolve_prefill(args.prefill_dtype, args.device, getattr(torch, args.dtype)))


def index_dtype_name(args) -> str:
    """The indexer keys' dtype by name, as the app's engine picks it (runtime/isa.py), made once here and sent
    to every worker: "bfloat16", "float32" or "model"."""
    return isa.name(isa.resolve(args.index_dtype, args.device))


def _command(argv) -> str:
    return "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_worker(spec: dict, env: dict, timeout: float | None) -> dict:
    from runtime.parallel import current

    if current().active:  # under torchrun: in this process, every rank in step (see main)
        from .worker import run

        t = time.perf_counter()
        res, rc = run(spec)
        res.update(worker_wall_s=time.perf_counter() - t, worker_rc=rc, in_process=True, world_size=current().world)
        return res
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        sp, op = Path(tmp, "spec.json"), Path(tmp, "out.json")
        sp.write_text(json.dumps(spec))
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.worker", str(sp), str(op)], cwd=ROOT, env=env,
                                  timeout=timeout, stdout=subprocess.DEVNULL)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            return {"kind": spec.get("kind", "runtime"), "context": spec["context"], "status": "timeout",
                    "error": f"killed after {timeout} s"}
        wall = time.perf_counter() - t
        if op.exists():
            res = json.loads(op.read_text())
        else:  # killed from outside (OOM killer, signal) before it could write
            res = {"kind": spec.get("kind", "runtime"), "context": spec["context"], "status": "crashed",
                   "error": f"worker exited with {rc} and wrote no result"}
        res["worker_wall_s"] = wall
        res["worker_rc"] = rc
        return res


def resolve_model(args) -> tuple[dict, str | None]:
    """(model description for the spec, HF-format folder usable by --compare or None)."""
    if args.config or (not args.model and not DEFAULT_MODEL_DIR.exists()):
        name = args.config or configs.DEFAULT_PRESET
        cfg = configs.preset(name, configs.parse_overrides(args.set))
        return {"preset": name, "config": cfg, "seed": args.seed}, None
    folder = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    if args.set:
        raise SystemExit("--set applies to --config presets, not to a checkpoint folder")
    return {"model_dir": str(folder.resolve())}, str(folder.resolve())


def _summary(cfg: dict) -> str:
    short = {SLIDING: "sliding", CSA: "CSA", HCA: "HCA"}
    lt = cfg.get("layer_types")
    return (f"vocab {cfg.get('vocab_size')}, hidden {cfg.get('hidden_size')}, layers [{', '.join(short.get(t, t) for t in lt or [])}],"
            f" {cfg.get('num_attention_heads')} heads x {cfg.get('head_dim')}, window {cfg.get('sliding_window')},"
            f" CSA/HCA rates {list((cfg.get('compress_rates') or {}).values())}, indexer {cfg.get('index_n_heads')} x"
            f" {cfg.get('index_head_dim')} top-{cfg.get('index_topk')}, MoE {cfg.get('n_routed_experts')} experts top-"
            f"{cfg.get('num_experts_per_tok')} + shared (hidden {cfg.get('moe_intermediate_size')}), hc_mult {cfg.get('hc_mult')}")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.report:
        sets = load_sets(args.report)
        if args.write_md:
            write_md(sets, Path(args.write_md), Path(args.results_dir), _command(argv))
        for rs in sets:
            print(report.console(rs))
        return 0
    if args.decode_tokens < 32:
        _log(f"note: --decode-tokens {args.decode_tokens} < 32; issue 6 asks for a median over >= 32 tokens")
    if args.decode_tokens < 1:
        raise SystemExit("--decode-tokens must be >= 1")
    import torch

    from runtime.parallel import init_from_env, under_torchrun

    if under_torchrun():
        # Every rank runs this same loop and its model calls in step (the Python API is collective); workers
        # run in-process (peak memory is then the run's, not per length), and rank 0 alone reports.
        if args.compare or not args.model:
            raise SystemExit("under torchrun, python -m bench measures a checkpoint folder (--model DIR) without "
                             "--compare")
        shard, device = init_from_env(args.device)
        args.device = str(device)  # cuda:LOCAL_RANK on GPUs
        if shard.rank:
            args.write_md, args.json = None, None
            sys.stdout = open(os.devnull, "w")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    model_spec, hf_dir = resolve_model(args)
    dtype = getattr(torch, args.dtype)
    index_dtype, prefill_dtype = index_dtype_name(args), prefill_dtype_name(args)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    t_run = time.perf_counter()
    command = _command(argv)
    mi = meminfo()
    limit = int(args.mem_limit_gb * 2 ** 30) if args.mem_limit_gb else int(0.9 * mi.get("MemAvailable", 8 << 30))

    mach = machine_info(args.device)
    _log(f"machine: {mach['cpu_model']}, ISA {mach['isa']}, {threads} torch threads; indexer keys "
         f"{isa.explain(args.index_dtype, args.device)}; prefill HCA pass {prefill_dtype}")
    _log(f"machine: measuring the {args.dtype} matmul peak ({args.peak_n}^3) and copy bandwidth")
    meta = {"command": command, "argv": sys.argv if argv is None else argv, "started": started,
            "label": args.label, "note": args.note,
            "machine": mach,
            "matmul_peak": matmul_peak(dtype, args.device, n=args.peak_n, reps=5),
            "copy_bandwidth": copy_bandwidth(args.device),
            "settings": {"dtype": args.dtype, "index_dtype": index_dtype, "index_dtype_asked": args.index_dtype,
                         "index_layout": isa.explain(args.index_dtype, args.device),
                         "prefill_dtype": prefill_dtype, "prefill_dtype_asked": args.prefill_dtype,
                         "chunk": args.chunk, "decode_tokens": args.decode_tokens,
                         "repeats": args.repeats, "single_repeat_above": args.single_repeat_above,
                         "threads": threads, "mem_limit_bytes": None if args.device.startswith("cuda") else limit,
                         "malloc_env": not args.no_malloc_env, "contexts": args.contexts}}
    lat = small_op_latency(sorted({1, threads}))
    meta["small_op_us"] = {str(k): v for k, v in lat.items()}
    if threads > 1 and lat[threads] > 3 * lat[1]:
        meta["contention_warning"] = (
            f"a small softmax took {lat[threads]:.0f} us with {threads} threads against {lat[1]:.0f} us with 1: the"
            f" CPUs are contended and every OpenMP parallel region stalls; numbers with {threads} threads measure"
            " the contention (consider --threads 1)")
        _log("WARNING: " + meta["contention_warning"])
    torch.set_num_threads(threads)
    cfg_dict = model_spec.get("config")
    if cfg_dict is None:
        from runtime.checkpoint import read_config
        cfg_dict = read_config(model_spec["model_dir"])
    meta["model"] = {"source": f"preset `{model_spec['preset']}` (random weights, seed {args.seed})"
                     if "preset" in model_spec else f"checkpoint `{model_spec['model_dir']}`",
                     "preset": model_spec.get("preset"), "overrides": configs.parse_overrides(args.set),
                     "summary": _summary(cfg_dict), "config": cfg_dict,
                     "weights_sha256": None if "preset" in model_spec else report.weights_digest(model_spec["model_dir"])}
    _log(f"matmul peak {report.fsi(meta['matmul_peak']['peak_flops'], 'FLOP/s')}; model: {meta['model']['source']}")

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not args.no_malloc_env:
        env.update(MALLOC_ENV)
    if args.profile == "auto":
        prof = {L for L in args.contexts if L <= 32768}
    else:
        prof = set(_ints(args.profile)) if args.profile else set()
    base = {"device": args.device, "dtype": args.dtype, "index_dtype": index_dtype, "threads": threads,
            "prefill_dtype": prefill_dtype,
            "chunk": args.chunk,
            "decode_tokens": args.decode_tokens, "decode_ref_context": args.decode_ref_context,
            "mem_limit_bytes": limit, "peak_n": args.peak_n, **model_spec}
    rs = {"meta": meta, "runs": [], "compare": []}
    for L in args.contexts:
        reps = 1 if L > args.single_repeat_above else args.repeats
        _log(f"context {L:,}: worker (repeats {reps})")
        res = run_worker({**base, "kind": "runtime", "context": L, "repeats": reps,
                          "split": not args.no_split, "profile": L in prof}, env, args.timeout)
        rs["runs"].append(res)
        if res.get("status") == "ok":
            mm = rs["meta"]["model"]
            mm.setdefault("params", res["params"])
            mm.setdefault("active_params", res["active_params"])
            _log(f"context {L:,}: prefill {res['prefill_tok_s']:.0f} tok/s ({res['prefill_s']:.2f} s), decode "
                 f"{res['decode_ms_median']:.2f} ms/token, peak RSS {report.fbytes(report.peak_rss(res))}")
        else:
            _log(f"context {L:,}: {res.get('status')}: {res.get('error')}")
    if args.compare:
        cctx = args.compare_contexts or [L for L in args.contexts if L <= args.hf_chunked_max]
        tmp = None
        if hf_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="bench-hf-")
            hf_dir = tmp.name
            _log(f"compare: saving a random-weight transformers model ({model_spec['preset']}) to {hf_dir}")
            from .compare import save_random_pair
            save_random_pair(model_spec["config"], hf_dir, seed=args.seed)
        cbase = {**base, "kind": "compare", "model_dir": hf_dir, "compare_repeats": args.compare_repeats,
                 "full_max": args.hf_full_max, "chunked_max": args.hf_chunked_max, "eager_max": args.eager_max}
        for k in ("preset", "config"):
            cbase.pop(k, None)
        for L in cctx:
            _log(f"compare {L:,}: worker")
            res = run_worker({**cbase, "context": L}, env, args.timeout)
            rs["compare"].append(res)
            if res.get("status") == "ok":
                _log(f"compare {L:,}: {json.dumps(res['ratios'])}")
            else:
                _log(f"compare {L:,}: {res.get('status')}: {res.get('error')}")
        if tmp:
            tmp.cleanup()
    meta["wall_s"] = time.perf_counter() - t_run

    text = report.console(rs)
    if args.json == "-":
        print(text, file=sys.stderr)
        print(json.dumps(rs, indent=1))
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(rs, indent=1))
    if args.write_md:
        prev = Path(args.results_dir) / "benchmarks.json"
        sets = load_sets(args.include or ([prev] if prev.is_file() else [])) + [rs]
        write_md(sets, Path(args.write_md), Path(args.results_dir), command)
    failed = [r for r in rs["runs"] + rs["compare"] if r.get("status") != "ok"]
    return 1 if failed else 0


def load_sets(paths) -> list[dict]:
    """Result sets from JSON files holding one set or a list of them (bench/results/benchmarks.json)."""
    sets = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        sets += d if isinstance(d, list) else [d]
    return sets


KEEP_MARKER = "<!-- sections below are written by other commands; python -m bench --write-md keeps them -->"


def write_md(sets: list[dict], md_path: Path, results: Path = RESULTS, command: str | None = None) -> None:
    sets = report.latest_per_kind(sets)  # a newer run replaces the set of its kind
    md_path = md_path.resolve()
    results.mkdir(parents=True, exist_ok=True)
    svg = results / "benchmarks.svg"
    svg.write_text(report.svg_plot(sets))
    (results / "benchmarks.json").write_text(json.dumps(sets, indent=1))
    try:
        rel = os.path.relpath(svg, md_path.parent)
    except ValueError:
        rel = str(svg)
    kept = ""  # sections measured by other commands (the load test, ...) below the marker survive a rewrite
    if md_path.is_file() and KEEP_MARKER in md_path.read_text():
        kept = md_path.read_text().split(KEEP_MARKER, 1)[1]
    md_path.write_text(report.markdown(sets, rel, command).rstrip("\n") + "\n\n" + KEEP_MARKER + kept)
    _log(f"wrote {md_path}, {svg} and {results / 'benchmarks.json'}")
