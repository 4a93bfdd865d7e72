"""Console tables, BENCHMARKS.md and its SVG plot, from result sets (one per `python -m bench` run).

A result set is the JSON the CLI writes: {"meta": {...}, "runs": [...], "compare": [...]}. The page
shows the newest set of each kind (latest_per_kind: same weights folder or preset, device, CPU, dtype, threads
and lengths), so a new run replaces its own section; the Targets section takes every figure from a single
set (same run, same machine) and names the weights and CPU it was measured with. Older sets leave the tree
for bench/results/history.tar.xz (bench/archive_results.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import shlex
from html import escape
from pathlib import Path

from runtime.isa import tier_of
from runtime.timing import CATEGORIES

CAT_LABEL = {"sliding_attn": "sliding", "csa_attn": "CSA attn", "csa_compress": "CSA compress",
             "indexer": "indexer", "hca_attn": "HCA attn", "hca_compress": "HCA compress", "moe": "MoE",
             "mhc": "mHC", "other": "other"}
GB = 1e9


def fbytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{int(n)} B"


def fnum(x, digits=3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    if mag >= digits:
        return f"{x:,.0f}"
    return f"{x:.{max(0, digits - 1 - mag)}f}"


def fsi(x, unit="FLOP") -> str:
    if x is None:
        return "-"
    for p, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


def ctx(n: int) -> str:
    return f"{n:,}"


def ok_runs(rs):
    return [r for r in rs.get("runs", []) if r.get("status") == "ok"]


def peak_rss(r) -> int | None:
    return (r.get("memory") or {}).get("rss", {}).get("VmHWM")


def machine_line(meta: dict) -> str:
    m = meta["machine"]
    pk = meta.get("matmul_peak") or {}
    la = m.get("loadavg_at_start")
    cap = f", torch kernels {m['torch_cpu_capability']}" if m.get("torch_cpu_capability") else ""
    parts = [f"{m['cpu_model']} (ISA {isa_of(m)}{cap})",
             f"{m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable, torch threads {m['torch_threads']})",
             f"{fbytes(m.get('mem_total_bytes'))} RAM",
             f"load average at start {la[0]:.2f}" if la else None,
             f"torch {m['torch']}", f"Python {m['python']}", f"device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else "")]
    line = ", ".join(p for p in parts if p)
    if pk:
        line += (f"; matmul peak {pk['dtype']} {pk['n']}^3: {fsi(pk['peak_flops'], 'FLOP/s')} best of {pk['reps']}"
                 f" (median {fsi(pk['median_flops'], 'FLOP/s')})")
    if meta.get("copy_bandwidth"):
        line += f"; copy bandwidth {meta['copy_bandwidth'] / GB:.1f} GB/s (read+write)"
    if meta.get("small_op_us"):
        line += "; small-op latency " + ", ".join(f"{v:.0f} us at {k} thread{'s' if k != '1' else ''}"
                                                  for k, v in meta["small_op_us"].items())
    if meta.get("contention_warning"):
        line += f". **Contended: {meta['contention_warning']}**"
    return line


def model_line(meta: dict, name: str | None = None) -> str:
    mm = meta.get("model", {})
    s = f"Model: {name or mm.get('source')}"
    if mm.get("params"):
        s += f", {mm['params'] / 1e6:.2f}M parameters ({mm.get('active_params', 0) / 1e6:.2f}M active)"
    if mm.get("summary"):
        s += f"; {mm['summary']}"
    st = meta.get("settings", {})
    s += (f". dtype {st.get('dtype')}, indexer keys {st.get('index_layout') or st.get('index_dtype', 'model')}, prefill HCA pass {st.get('prefill_dtype', 'model')}, prefill chunk {st.get('chunk')}, {st.get('decode_tokens')} decode tokens,"
          f" repeats {st.get('repeats')} (1 above {st.get('single_repeat_above'):,} tokens)")
    if st.get("malloc_env"):
        s += ", glibc `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e11` (as the app around each prefill)"
    if st.get("mem_limit_bytes"):
        s += f", address-space guard {fbytes(st['mem_limit_bytes'])} per length"
    return s + "."


# ------------------------------------------------------------------------------------------------
# tables (markdown; the console prints the same rows)

def _table(head: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Markdown table; the first `left` columns are left-aligned, the rest (numbers) right-aligned."""
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i >= left else "---" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def main_table(rs: dict) -> list[str]:
    rows = []
    cuda = any("cuda_max_allocated" in (r.get("memory") or {}) for r in rs.get("runs", []))
    for r in rs.get("runs", []):
        if r.get("status") != "ok":
            rows.append([ctx(r["context"]), f"**{r.get('status')}**: {escape(r.get('error', ''))[:120]}"]
                        + [""] * (10 if cuda else 9))
            continue
        cb = r["cache_after_prefill"]
        p10, p90 = r["decode_ms_p10_p90"]
        ref = (f"{r['decode_ratio_vs_ref']:.2f}x ({fnum(r['decode_ref_ms_median'])} ms at {ctx(r['decode_ref_context'])})"
               if r.get("decode_ratio_vs_ref") else "-")
        rows.append([ctx(r["context"]), ctx(r["prefill_tokens"]), fnum(r["prefill_s"]), fnum(r["prefill_tok_s"]),
                     f"{fnum(r['decode_ms_median'])} [{fnum(p10)}-{fnum(p90)}]", ref]
                    + ([fbytes(r["memory"].get("cuda_max_allocated"))] if cuda else [])
                    + [fbytes(peak_rss(r)), fbytes(r.get("rss_before_prefill")),
                       fbytes(cb["components"]["total"]), fbytes(cb["dense_equivalent"]),
                       f"{cb['components']['total'] / max(1, cb['dense_equivalent']):.3f}"])
    return _table(["context", "prefilled", "prefill s", "prefill tok/s", "decode ms/token median [p10-p90]",
                   "decode / decode at the reference length (same process, alternating steps)"]
                  + (["peak CUDA allocated"] if cuda else [])
                  + ["peak RSS", "RSS before prefill", "cache", "dense-equivalent cache", "cache / dense"], rows)


def cache_table(rs: dict) -> list[str]:
    rows = []
    for r in ok_runs(rs):
        cb = r["cache_after_prefill"]
        c = cb["components"]
        rows.append([ctx(r["context"])] + [fbytes(c[k]) for k in ("window", "csa_entries", "indexer_keys",
                                                                   "hca_entries", "buffers", "total")]
                    + [fbytes(cb["entries_capacity"]), fbytes(cb["dense_equivalent"])])
    return _table(["context", "window", "CSA entries", "indexer keys", "HCA entries", "buffers", "total",
                   "entry buffers allocated", "dense-equivalent"], rows)


def split_tables(rs: dict) -> list[str]:
    runs = [r for r in ok_runs(rs) if r.get("split_prefill_s")]
    if not runs:
        return []
    head = ["context", "phase"] + [CAT_LABEL[c] for c in CATEGORIES] + ["total"]  # noqa: E501
    rows = []
    for r in runs:
        sp = r["split_prefill_s"]
        tot = sum(sp.values())
        rows.append([ctx(r["context"]), f"prefill (% of {fnum(tot)} s)"]
                    + [f"{100 * sp[c] / tot:.1f}%" for c in CATEGORIES] + ["100%"])
        sd = r["split_decode_ms"]
        rows.append(["", "decode (ms/token)"] + [fnum(sd[c]) for c in CATEGORIES] + [fnum(sum(sd.values()))])
    return _table(head, rows, left=2)


def flops_table(rs: dict) -> list[str]:
    pk = rs["meta"].get("matmul_peak", {}).get("peak_flops")
    bw = rs["meta"].get("copy_bandwidth")
    rows = []
    for r in ok_runs(rs):
        fp, fd = r["flops_prefill"], r["flops_decode_per_token"]
        perf, use = sum(fp["performed"].values()), sum(fp["useful"].values())
        wpk = r.get("matmul_peak_worker", {}).get("peak_flops")
        eff = use / r["prefill_s"]
        rows.append([ctx(r["context"]), fsi(perf), fsi(use), f"{use / perf:.2f}", fsi(r["prefill_flop_s"], "FLOP/s"),
                     f"{100 * r['prefill_flop_s'] / pk:.1f}%" if pk else "-",
                     f"{100 * r['prefill_flop_s'] / wpk:.1f}%" if wpk else "-",
                     f"{100 * eff / pk:.1f}%" if pk else "-",
                     fsi(sum(fd["performed"].values())), fsi(r["decode_flop_s"], "FLOP/s"),
                     f"{100 * r['decode_flop_s'] / pk:.2f}%" if pk else "-",
                     fbytes(r.get("decode_bytes_per_token")),
                     f"{100 * r['decode_bytes_s'] / bw:.2f}%" if (bw and r.get("decode_bytes_s")) else "-"])
    return _table(["context", "prefill FLOPs performed", "useful", "useful / performed", "prefill achieved",
                   "% of run-start peak", "% of worker's own peak", "useful FLOP/s, % of peak", "decode FLOPs/token",
                   "decode achieved",
                   "% of peak", "decode bytes/token (floor)", "% of copy bandwidth"], rows)


def category_flops_table(r: dict, peak: float | None) -> list[str]:
    """Per category at one length: time share, FLOPs, achieved FLOP/s (where the time is lost)."""
    sp, fp = r.get("split_prefill_s"), r["flops_prefill"]
    if not sp:
        return []
    tot = sum(sp.values())
    rows = []
    for c in CATEGORIES:
        f = fp["performed"].get(c, 0.0)
        u = fp["useful"].get(c, 0.0)
        rate = f / sp[c] if sp[c] > 0 else None
        rows.append([CAT_LABEL[c], f"{100 * sp[c] / tot:.1f}%", fnum(sp[c]), fsi(f), fsi(u), fsi(rate, "FLOP/s"),
                     f"{100 * rate / peak:.1f}%" if (rate and peak) else "-"])
    return _table(["category", "share of prefill time", "seconds", "FLOPs performed", "FLOPs useful",
                   "achieved", "% of matmul peak"], rows)


def compare_table(rs: dict) -> list[str]:
    rows = []
    for r in rs.get("compare", []):
        if r.get("status") != "ok":
            rows.append([ctx(r["context"]), f"**{r.get('status')}**: {escape(r.get('error', ''))[:160]}", "", "", "", "",
                         "", ""])
            continue
        s = r["seconds"]
        for a, b, err_key, label in (
                ("runtime_chunked", "hf_chunked", "err_chunked_last_position", "chunked prefill vs transformers chunked (DynamicCache), last position"),
                ("runtime_full", "hf_full", "err_full_all_positions", "full forward vs transformers full forward, all positions"),
                ("runtime_full", "runtime_eager", "err_sparse_vs_eager", "full forward vs the runtime's eager path, all positions")):
            if a in s and b in s:
                sc = (r.get("selection_check") or {}).get({"hf_full": "hf", "runtime_eager": "eager"}.get(b, ""))
                rows.append([ctx(r["context"]), label, fnum(s[a]), fnum(s[b]), f"{s[b] / s[a]:.1f}x",
                             f"{r.get(err_key, float('nan')):.2e}", _bad(r.get(err_key.replace("err_", "bad_"))),
                             _ties(sc)])
        if "err_eager_vs_hf" in r:
            rows.append([ctx(r["context"]), "eager path vs transformers full forward, all positions", "", "", "",
                         f"{r['err_eager_vs_hf']:.2e}", _bad(r.get("bad_eager_vs_hf")), ""])
    return _table(["context", "path", "runtime s", "reference s", "reference / runtime (speed-up)",
                   "max rel. logits error", "positions over 1e-4", "tie-aware check"], rows, left=2)


def _ties(sc) -> str:
    if not sc:
        return "-"
    agree = sc.get("max_err_where_selection_agrees")
    return (f"top-k selections differ at {sc['selection_differs_at']} positions, {sc['tie_only']} only by (near-)equal"
            f" scores at the k-th place; {sc['bad_logits_unexplained']} mismatches unexplained; max error where"
            f" selections agree {agree:.1e}" if agree is not None else "-")


def _bad(b) -> str:
    if not b:
        return "-"
    s = f"{b['count']} of {b['of']:,}"
    if b["count"]:
        s += " (first: " + ", ".join(str(x) for x in b["first"][:4]) + ")"
    return s


def profile_tables(rs: dict, rows: int = 12) -> list[str]:
    out = []
    for r in ok_runs(rs):
        pr = r.get("profile")
        if not pr or "prefill_chunk" not in pr:
            continue
        for key, label in (("prefill_chunk", f"one {pr['prefill_chunk']['tokens']}-token prefill chunk"),
                           ("decode_16", "16 decode steps")):
            t = pr[key]
            out += ["", f"**Context {ctx(r['context'])}, {label} at depth {ctx(pr['depth'])}** "
                        f"(torch.profiler, self {'device' if t.get('clock') == 'device' else 'CPU'} time, total"
                        f" {fnum(t['total_self_cpu_ms'])} ms):", ""]
            out += _table(["op", "calls", "self ms", "share"],
                          [[f"`{e['op']}`", e["calls"], fnum(e["self_ms"]), f"{100 * e['share']:.1f}%"]
                           for e in t["top"][:rows]])
    return out


# ------------------------------------------------------------------------------------------------
# targets

def _find(sets, L, kind="runs"):
    """(set, result) with context L, the latest set first."""
    for rs in reversed(sets):
        for r in rs.get(kind, []):
            if r.get("context") == L and r.get("status") == "ok":
                yield rs, r


def _pair(sets, a, b):
    """A set holding ok runtime results at both lengths (for same-run ratios)."""
    for rs in reversed(sets):
        ra = next((r for r in ok_runs(rs) if r["context"] == a), None)
        rb = next((r for r in ok_runs(rs) if r["context"] == b), None)
        if ra and rb:
            return rs, ra, rb
    return None


def threads(rs: dict) -> int:
    return rs["meta"]["machine"].get("torch_threads") or rs["meta"].get("settings", {}).get("threads") or 0


def default_model_set(rs: dict) -> bool:
    """Targets are about the default model (checkpoint or the tiny5m preset) on CPU."""
    mm = rs["meta"].get("model", {})
    return (mm.get("preset") in (None, "tiny5m") and not mm.get("overrides")
            and not str(rs["meta"]["machine"].get("device", "cpu")).startswith("cuda"))


# ------------------------------------------------------------------------------------------------
# result sets on the page: which one a newer run replaces, and what each figure names

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "model"
_PAGE_ONLY = {"--label", "--note", "--write-md", "--include", "--results-dir", "--report"}  # not needed to rerun


def started(rs: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(rs["meta"]["started"])


def set_kind(rs: dict) -> tuple:
    """What a newer run replaces: the same weights folder or preset (and overrides), device, CPU (model and
    ISA), dtype, torch threads, lengths and --compare lengths. The weights in the folder may have changed since."""
    meta = rs["meta"]
    mm, st = meta.get("model", {}), meta.get("settings", {})
    return (mm.get("preset") or mm.get("source"), json.dumps(mm.get("overrides") or {}, sort_keys=True),
            meta["machine"].get("device"), cpu_key(rs), st.get("dtype"), threads(rs),
            tuple(st.get("contexts") or [r["context"] for r in rs.get("runs", [])]),
            tuple(sorted(c["context"] for c in rs.get("compare", []))))


def latest_per_kind(sets: list[dict]) -> list[dict]:
    """The newest set of each kind, oldest first."""
    latest = {}
    for rs in sorted(sets, key=started):
        latest[set_kind(rs)] = rs
    return sorted(latest.values(), key=started)


def weights_digest(folder) -> str | None:
    """sha256 over a checkpoint folder's safetensors files (names and bytes): which weights a set ran with."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(f.name.encode() + b"\0" + hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def _shipped_config() -> dict | None:
    p = SHIPPED / "config.json"
    return json.loads(p.read_text()) if p.is_file() else None


def weights(meta: dict) -> str:
    """The weights a set ran with: "shipped model" when its recorded weights digest is that of assets/model
    now; else meta.model.checkpoint (a name recorded with the set), else a step named in --label; "shipped
    config" when its config.json is the shipped model's."""
    mm = meta.get("model", {})
    if mm.get("weights_sha256") and mm["weights_sha256"] == weights_digest(SHIPPED):
        return f"shipped model (weights sha256 {mm['weights_sha256'][:12]})"
    if mm.get("preset"):
        name = f"preset `{mm['preset']}`, random weights" + (", overridden" if mm.get("overrides") else "")
    else:
        step = re.search(r"step \d+(,\d{3})*", meta.get("label") or "")
        name = mm.get("checkpoint") or (step.group(0) if step else
                                        f"{mm.get('source')} (unnamed: give its step in --label)")
    shipped = _shipped_config()
    if shipped is not None and mm.get("config") is not None:
        name += " (shipped config)" if mm["config"] == shipped else " (not the shipped config)"
    return name


def isa_of(m: dict) -> str:
    """A machine's ISA tier (runtime/isa.py); sets recorded before it was stored: from their CPU flags."""
    return m.get("isa") or tier_of(m.get("cpu_flags", []))


def cpu_key(rs: dict) -> tuple[str, str]:
    """Which CPU a set ran on, as the targets keep them apart: (model name, ISA tier)."""
    m = rs["meta"]["machine"]
    return m.get("cpu_model", "unknown"), isa_of(m)


def cpu(rs: dict) -> str:
    """The processor, short: `Intel Xeon with AMX, 2 vCPU; 1 thread`, `AMD EPYC 7B13 with AVX2, ...` (or the GPU)."""
    m, th = rs["meta"]["machine"], threads(rs)
    if str(m.get("device", "cpu")).startswith("cuda"):
        return m.get("gpu") or m["device"]
    name = " ".join(re.sub(r"\((R|TM)\)|\bProcessor\b|\bCPU\b|@.*", " ", m["cpu_model"]).split())
    if isa_of(m) != "baseline":
        name += f" with {isa_of(m)}"
    return f"{name}, {m['logical_cpus']} vCPU; {th} thread{'s' if th != 1 else ''}"


def result_name(rs: dict) -> str:
    """The set's JSON file name (its --json), else when it started."""
    argv = rs["meta"].get("argv") or []
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--json" and argv[i + 1] != "-"), None)
    return Path(path).name if path else rs["meta"]["started"]


def rerun_command(meta: dict) -> str:
    """The command that measured the set, without the options that only name it or write the page."""
    argv = list(meta.get("argv") or [])
    if argv and argv[0].endswith(".py"):
        argv = argv[1:]
    if not argv:
        return meta["command"]
    out, skip = [], False
    for a in argv:
        if a.startswith("--"):
            skip = a.split("=", 1)[0] in _PAGE_ONLY
        if not skip:
            out.append(a)
    return "python -m bench " + " ".join(shlex.quote(a) for a in out)


def set_title(rs: dict) -> str:
    meta = rs["meta"]
    lengths = [r["context"] for r in rs.get("runs", [])]
    s = f"`{result_name(rs)}`: {weights(meta)} · {cpu(rs)} · {', '.join(_kctx(L) for L in lengths)} tokens"
    cmp = [c["context"] for c in rs.get("compare", [])]
    return s + (f" · against transformers at {', '.join(_kctx(L) for L in cmp)}" if cmp else "")


def targets(all_sets: list[dict]) -> list[list[str]]:
    """Rows of [target, figure, status, weights, CPU, run]: each figure from one set (one run, one CPU),
    per CPU (model and ISA) the newest set that measured it; a target measured on several CPUs, or with
    several thread counts, gets a row for each. "Not run yet" only where no CPU measured it."""
    groups: dict[tuple, list[dict]] = {}
    for rs in all_sets:
        if default_model_set(rs):
            groups.setdefault(cpu_key(rs), []).append(rs)
    per_cpu = [_targets_on(g, all_sets) for g in groups.values()] or [_targets_on([], all_sets)]
    rows = []
    for target in dict.fromkeys(r[0] for g in per_cpu for r in g):
        mine = [r for g in per_cpu for r in g if r[0] == target]
        measured = [r for r in mine if r[5] != "-"]
        for r in measured or mine[:1]:
            if r not in rows:  # a figure every group shares (the CUDA run) once
                rows.append(r)
    return rows


def _targets_on(sets: list[dict], all_sets: list[dict]) -> list[list[str]]:
    """targets() over the default-model sets of one CPU (`all_sets`: every set, for the CUDA row)."""
    NR = "not run yet"
    rows = []

    def line(target, measured, status, rs=None):
        rows.append([target, measured, status] + ([weights(rs["meta"]), cpu(rs), f"`{result_name(rs)}`"]
                                                  if rs else ["-", "-", "-"]))

    def status(ok):
        return "**met**" if ok else "**not met**"

    def per_threads(found):
        """The newest (set, run) per torch thread count, most threads (the app's default) first."""
        out = {}
        for rs, r in found:
            out.setdefault(threads(rs), (rs, r))
        return [out[k] for k in sorted(out, reverse=True)]

    M = 1048576

    def decode_ratio(L, limit, target):
        """Prefer the same-process ratio (steps alternating with a 4,096-token cache), else across workers."""
        same = [x for x in _find(sets, L) if x[1].get("decode_ref_context") == 4096]
        for rs, r1 in per_threads(same):
            q = r1["decode_ratio_vs_ref"]
            txt = (f"{q:.2f}x: {fnum(r1['decode_ms_median'])} vs {fnum(r1['decode_ref_ms_median'])} ms/token"
                   " (same process, alternating steps)")
            p = _pair([rs], L, 4096)
            if p:
                txt += f"; across workers {p[1]['decode_ms_median'] / p[2]['decode_ms_median']:.2f}x"
            line(target, txt, status(q <= limit), rs)
        if same:
            return
        p = _pair(sets, L, 4096)
        if p:
            rs, r1, r0 = p
            q = r1["decode_ms_median"] / r0["decode_ms_median"]
            return line(target, f"{fnum(r1['decode_ms_median'])} vs {fnum(r0['decode_ms_median'])} ms/token = {q:.2f}x"
                        " (across workers)", status(q <= limit), rs)
        line(target, NR, "-")

    decode_ratio(M, 1.5, "Decode at 1,048,576 tokens <= 1.5x decode at 4,096 (default model, CPU) [issue 6]")
    found = per_threads(_find(sets, M))
    for rs, r in found:
        rss = peak_rss(r)
        line("Prefill of 1,048,576 tokens: peak RSS < 3 GB and under 10 minutes on this 2-core machine [issue 6]",
             f"peak RSS {fbytes(rss)} ({rss / GB:.2f} GB), prefill {fnum(r['prefill_s'])} s "
             f"({r['prefill_tok_s']:.0f} tok/s)", status(rss < 3 * GB and r["prefill_s"] < 600), rs)
    if not found:
        line("Prefill of 1,048,576 tokens: peak RSS < 3 GB and under 10 minutes on this 2-core machine [issue 6]", NR, "-")
    c = next(_find(sets, 32768, "compare"), None)
    if c and "hf_chunked" in c[1]["seconds"]:
        rs, c = c
        s = c["seconds"]
        sp = s["hf_chunked"] / s["runtime_chunked"]
        err = c["err_chunked_last_position"]
        line("At 32,768 tokens, prefill >= 10x faster than transformers' chunked path, matching logits [issue 6]",
             f"{sp:.1f}x ({fnum(s['runtime_chunked'])} s vs {fnum(s['hf_chunked'])} s); max rel. error {err:.1e}",
             status(sp >= 10 and err < 1e-4), rs)
    else:
        line("At 32,768 tokens, prefill >= 10x faster than transformers' chunked path, matching logits [issue 6]",
             NR + " (needs `--compare` at 32,768)", "-")
    p = _pair(sets, 131072, 4096)
    if p:
        rs, r1, r0 = p
        q = r1["prefill_tok_s"] / r0["prefill_tok_s"]
        line("Prefill tokens/s at 131,072 >= half of that at 4,096 [issue 6]",
             f"{fnum(r1['prefill_tok_s'])} vs {fnum(r0['prefill_tok_s'])} tok/s = {q:.2f}", status(q >= 0.5), rs)
    else:
        line("Prefill tokens/s at 131,072 >= half of that at 4,096 [issue 6]", NR, "-")
    r = peak_share_run(sets)
    if r:
        rs, r = r
        pk = rs["meta"]["matmul_peak"]["peak_flops"]
        share = r["prefill_flop_s"] / pk
        line("Prefill >= 30% of the measured matmul peak of its dtype at 32,768 tokens [issue 6]",
             f"{100 * share:.1f}% ({fsi(r['prefill_flop_s'], 'FLOP/s')} of {fsi(pk, 'FLOP/s')}); "
             "where the time goes: under its run", status(share >= 0.3), rs)
    else:
        line("Prefill >= 30% of the measured matmul peak of its dtype at 32,768 tokens [issue 6]", NR, "-")
    cuda = [rs for rs in all_sets if str(rs["meta"]["machine"].get("device", "")).startswith("cuda")]
    line("CUDA run with a Flash-width config: tokens/s, share of bandwidth and matmul peak [issue 6, optional]",
         "see its run" if cuda else "not run; command: `python -m bench --device cuda --dtype bfloat16"
         " --config flash-width --contexts 4096,32768,131072`", "recorded" if cuda else "-", cuda[-1] if cuda else None)
    r = next(_find(sets, 262144), None)
    if r:
        rs, r = r
        rss = peak_rss(r)
        line("262,144-token prefill with the ~5M config: peak RSS < 4 GB [issue 2]",
             f"peak RSS {fbytes(rss)} ({rss / GB:.2f} GB), prefill {fnum(r['prefill_s'])} s", status(rss < 4 * GB), rs)
    else:
        line("262,144-token prefill with the ~5M config: peak RSS < 4 GB [issue 2]", NR, "-")
    decode_ratio(262144, 2.0, "Decode at 262,144 tokens <= 2x decode at 4,096 [issue 2]")
    r = found[0] if found else None
    if r:
        rs, r = r
        line("1,048,576 tokens: time and memory recorded [issue 2]",
             f"prefill {fnum(r['prefill_s'])} s, decode {fnum(r['decode_ms_median'])} ms/token, "
             f"peak RSS {fbytes(peak_rss(r))}, cache {fbytes(r['cache_after_prefill']['components']['total'])}",
             "recorded", rs)
    else:
        line("1,048,576 tokens: time and memory recorded [issue 2]", NR, "-")
    return rows


def peak_share_run(sets: list[dict]):
    """(set, run) for the matmul-peak target: the newest timed 32,768-token run of a default-model set."""
    return next(_find([rs for rs in sets if default_model_set(rs)], 32768), None)


# ------------------------------------------------------------------------------------------------
# SVG plot (plain code: no browser, no extra package)

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
_DASH = {"solid": "", "dashed": ' stroke-dasharray="7,4"', "dotted": ' stroke-dasharray="2,3"'}


def _panel(x0, y0, w, h, series, title, ylabel, xs_all, styles):
    """One log-log panel; series carry color and style; the legend explains the styles (metrics)."""
    pts = [p for s in series for p in s["points"] if p[1] and p[1] > 0]
    if not pts:
        return []
    xmin, xmax = min(xs_all), max(xs_all)
    if xmin == xmax:
        xmin, xmax = xmin / 2, xmax * 2
    ymin = 10 ** math.floor(math.log10(min(p[1] for p in pts)))
    ymax = 10 ** math.ceil(math.log10(max(p[1] for p in pts)))
    if ymin == ymax:
        ymax *= 10
    lx0, lx1 = math.log10(xmin) - 0.15, math.log10(xmax) + 0.15
    ly0, ly1 = math.log10(ymin), math.log10(ymax)

    def X(x):
        return x0 + (math.log10(x) - lx0) / (lx1 - lx0) * w

    def Y(y):
        return y0 + h - (math.log10(y) - ly0) / (ly1 - ly0) * h

    o = [f'<text x="{x0 + w / 2}" y="{y0 - 12}" text-anchor="middle" font-size="14" font-weight="bold">{escape(title)}</text>',
         f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#888"/>']
    e = ly0
    while e <= ly1 + 1e-9:
        y = Y(10 ** e)
        o.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#ddd"/>')
        o.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_sci(10 ** e)}</text>')
        e += 1
    for x in sorted(set(xs_all)):
        o.append(f'<line x1="{X(x):.1f}" y1="{y0}" x2="{X(x):.1f}" y2="{y0 + h}" stroke="#eee"/>')
        o.append(f'<text x="{X(x):.1f}" y="{y0 + h + 16}" text-anchor="middle" font-size="11">{_kctx(x)}</text>')
    o.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 34}" text-anchor="middle" font-size="12">context length (tokens, log scale)</text>')
    o.append(f'<text x="{x0 - 52}" y="{y0 + h / 2}" text-anchor="middle" font-size="12" '
             f'transform="rotate(-90 {x0 - 52} {y0 + h / 2})">{escape(ylabel)}</text>')
    for s in series:
        p = sorted((x, y) for x, y in s["points"] if y and y > 0)
        if not p:
            continue
        dash = _DASH[s["style"]]
        if len(p) > 1:
            path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in p)
            o.append(f'<polyline points="{path}" fill="none" stroke="{s["color"]}" stroke-width="2"{dash}/>')
        for x, y in p:
            o.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3.5" fill="{s["color"]}"><title>{escape(s["name"])}: '
                     f'{_kctx(x)} tokens, {y:.4g}</title></circle>')
    for i, (style, label) in enumerate(styles):
        ly = y0 + h + 58 + 16 * i  # legend of the line styles, below the axes
        o.append(f'<line x1="{x0 - 40}" y1="{ly - 4}" x2="{x0 - 10}" y2="{ly - 4}" stroke="#333" stroke-width="2"{_DASH[style]}/>')
        o.append(f'<text x="{x0 - 4}" y="{ly}" font-size="11">{escape(label)}</text>')
    return o


def _sci(v):
    e = int(round(math.log10(v)))
    return {0: "1", 1: "10", 2: "100", 3: "1k", 4: "10k", 5: "100k", 6: "1M", 7: "10M", 8: "100M",
            9: "1G", 10: "10G", 11: "100G"}.get(e, f"1e{e}")


def _kctx(x):
    return f"{x // 1048576}M" if x >= 1048576 and x % 1048576 == 0 else (f"{x // 1024}k" if x % 1024 == 0 else str(x))


def svg_plot(sets: list[dict]) -> str:
    """Speed and memory against context length (log-log): colour = result set, line style = metric."""
    rs = [s for s in sets if ok_runs(s)]
    w, pw, ph = 1120, 380, 280
    h = 50 + ph + 58 + 16 * 3 + 24 + 16 * len(rs) + 10
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
         'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>']
    speed, mem, xs, names = [], [], [], []
    for k, s in enumerate(rs):
        col = _COLORS[k % len(_COLORS)]
        name = set_title(s).replace("`", "")
        names.append((col, name))
        runs = ok_runs(s)
        xs += [r["context"] for r in runs]
        speed.append({"name": f"prefill tok/s, {name}", "color": col, "style": "solid",
                      "points": [(r["context"], r["prefill_tok_s"]) for r in runs]})
        speed.append({"name": f"decode tok/s, {name}", "color": col, "style": "dashed",
                      "points": [(r["context"], 1e3 / r["decode_ms_median"]) for r in runs]})
        cmp = [c for c in s.get("compare", []) if c.get("status") == "ok" and "hf_chunked" in c["seconds"]]
        if cmp:
            xs += [c["context"] for c in cmp]
            speed.append({"name": f"transformers chunked prefill tok/s, {name}", "color": col, "style": "dotted",
                          "points": [(c["context"], c["context"] / c["seconds"]["hf_chunked"]) for c in cmp]})
        mem.append({"name": f"peak RSS MiB, {name}", "color": col, "style": "solid",
                    "points": [(r["context"], peak_rss(r) / 2 ** 20) for r in runs]})
        mem.append({"name": f"cache MiB, {name}", "color": col, "style": "dashed",
                    "points": [(r["context"], r["cache_after_prefill"]["components"]["total"] / 2 ** 20) for r in runs]})
        mem.append({"name": f"dense-equivalent cache MiB, {name}", "color": col, "style": "dotted",
                    "points": [(r["context"], r["cache_after_prefill"]["dense_equivalent"] / 2 ** 20) for r in runs]})
    if xs:
        o += _panel(90, 50, pw, ph, speed, "Speed", "tokens per second (log)", xs,
                    [("solid", "prefill tokens/s"), ("dashed", "decode tokens/s (1000 / ms per token)"),
                     ("dotted", "transformers' chunked prefill tokens/s (--compare)")])
        o += _panel(90 + pw + 170, 50, pw, ph, mem, "Memory", "MiB (log)", xs,
                    [("solid", "peak RSS of the worker process"), ("dashed", "cache (cache.nbytes)"),
                     ("dotted", "dense-equivalent cache (cache.dense_nbytes)")])
        y = 50 + ph + 58 + 16 * 3 + 16
        o.append(f'<text x="50" y="{y}" font-size="12" font-weight="bold">Colour = result set:</text>')
        for i, (col, name) in enumerate(names):
            yy = y + 16 * (i + 1)
            o.append(f'<rect x="50" y="{yy - 9}" width="24" height="8" fill="{col}"/>')
            o.append(f'<text x="82" y="{yy}" font-size="11">{escape(name)}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


# ------------------------------------------------------------------------------------------------

def markdown(sets: list[dict], svg_rel: str | None, command: str | None = None) -> str:
    """The page: how things are measured, the targets, then the latest run of each kind (speed, memory,
    transformers comparison). The per-layer time split, FLOPs and profiles stay in the JSON and the console."""
    sets = latest_per_kind(sets)
    L = ["# Benchmarks", "",
         "Speed and memory against context length, measured by `python -m bench` (bench/). Each length runs in a",
         "fresh worker process: the engine's chunked prefill and decode step (runtime/generate.py), then greedy",
         "decode steps; tokens/s = prefilled tokens / median prefill time, decode = median over all steps, peak RSS =",
         "the worker's VmHWM (model included). The matmul peak and copy bandwidth are measured at the start of each",
         "run. Every ratio comes from one run; every figure names the weights it ran with (\"shipped config\": the",
         "config.json of `assets/model`, the shipped model, whose step is in assets/model/MODEL_CARD.md) and the",
         "CPU (model and ISA: AVX2, AVX-512, AVX512-BF16 or AMX) and torch threads it ran on; a target measured on",
         "several CPUs gets a row for each, and no row mixes CPUs.", "",
         "A run with `--json bench/results/NAME.json --write-md` replaces the section of its kind (same weights",
         "folder or preset, device, CPU, dtype, threads and lengths) and keeps the others, read from",
         "bench/results/benchmarks.json; `python -m bench --report bench/results/benchmarks.json --write-md`",
         "re-renders without running. Earlier runs and this page's earlier versions are in",
         "bench/results/history.tar.xz (`python bench/archive_results.py --list`).", ""]
    if command:
        L += [f"Rendered by `{command}`.", ""]
    L += ["## Targets", ""]
    L += _table(["target", "figure", "status", "weights", "CPU", "run"], targets(sets), left=6)
    if svg_rel:
        L += ["", "## Plot", "", f"![tokens/s and memory against context length]({svg_rel})"]
    L += ["", "## Latest runs"]
    peak = peak_share_run(sets)
    for rs in sets:
        meta = rs["meta"]
        L += ["", f"### {set_title(rs)}", "",
              f"`{rerun_command(meta)}` (started {meta['started']}, {fnum(meta.get('wall_s'))} s). Machine:"
              f" {machine_line(meta)}. {model_line(meta, weights(meta))}"]
        if meta.get("note"):
            L += ["", meta["note"]]
        if rs.get("runs"):
            L += [""] + main_table(rs)
        if rs.get("compare"):
            L += ["", "Against transformers' `DeepseekV4ForCausalLM` and the runtime's eager path, on the same random"
                      " weights saved with `save_pretrained` (error: max |a - b| / max |b|):", ""]
            L += compare_table(rs)
        if peak and peak[0] is rs and peak[1].get("split_prefill_s"):
            L += ["", f"Where the prefill time goes at {ctx(peak[1]['context'])} tokens (wall time by part of the"
                      " model, FLOPs counted from shapes by bench/flops.py):", ""]
            L += category_flops_table(peak[1], meta.get("matmul_peak", {}).get("peak_flops"))
        for r in rs.get("runs", []) + rs.get("compare", []):
            if r.get("status") not in (None, "ok"):
                L += ["", f"Failure at {ctx(r['context'])} ({r.get('kind')}): `{r.get('error')}`"]
    return "\n".join(L) + "\n"


def console(rs: dict) -> str:
    out = [machine_line(rs["meta"]), model_line(rs["meta"]), ""]
    if rs.get("runs"):
        out += main_table(rs) + [""] + cache_table(rs) + [""] + split_tables(rs) + [""] + flops_table(rs)
    if rs.get("compare"):
        out += [""] + compare_table(rs)
    pt = profile_tables(rs)
    if pt:
        out += pt
    return "\n".join(out)
