"""Long-context retrieval evaluation: needle facts (niah), key-value lookup (kv), quote continuation (continue),
and RULER's multi-key / multi-value / multi-query needles (niah --keys K, mv, mq).

    python -m runtime eval niah --lengths 4096,32768 --depths 0,0.25,0.5,0.75,1 --seed 0 [--haystack PATH ...]
                                [--model DIR] [--n 4] [--json]
    python -m runtime eval niah --keys 5 ...   # five facts of one template, other keys; one asked
    python -m runtime eval mv [--keys 4] ...   # one key, four values planted apart; all asked (a set)
    python -m runtime eval mq [--keys 2] ...   # two keys asked at once (their values, a set)
    python -m runtime eval kv --formats json,csv,config,code ...   # blocks in those formats; per-format accuracy
    python -m runtime eval niah --sources gcide ...   # haystacks of one kind of held-out text (code, manuals, ...)
    python -m runtime eval niah --haystack-dir DIR [--depths ...] [--documents N|NAMES] [--json]   (runtime/probe.py)

For every length L and each of ``n`` haystacks, a haystack of about L tokens is cut from the given files
(or, by default, from the held-out split of runtime/haystacks.py, pinned by runtime/haystacks.json: text
the default model never saw in training) and one item per requested depth is planted in it with a seeded generator (runtime/tasks.py has
the formats): a needle line, a structured key-value block, or -- for ``continue`` -- nothing (a unique
snippet at that depth is quoted back). The haystack is prefilled once into a runtime ``Cache`` through the
generation core (runtime/generate.py, the path the app serves); each question then continues that cache from
a mark (``cache.rewind``) in the chat layout of runtime/tokenizer.py, is decoded greedily until EOS or
<User> (the app's stop ids), and is judged by exact match of the stripped strings. So a haystack holds one
item per depth (the others are distractors with other keys), and one prefill serves all depths.

Per (length, depth) cell: ``accuracy`` (exact match), ``n``, and the selection evidence of the first
answer-token query (the ``<｜Assistant｜>`` position): ``recall`` = mean over cases of the share of CSA
layers whose lightning-indexer top-k held an entry covering the value (an entry covers the tokens of its
own pooling window, [w*m, (w+1)*m)); ``rank`` = mean 1-based rank, by index score, of the best such entry
among the selected ones (over the hits); ``first`` = share of cases where the asked item's best entry
outranks the entries of every other item planted in the same haystack (selection that tells the keys
apart, not just "something planted is here"). Read from ``runtime.Capture``; values planted within the
last window of the prompt can also be read through the sliding window, which recall does not see.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from . import tasks as T
from .generate import GenerationParams, generate, prefill
from .introspect import Capture, span_ranks
from .isa import CHOICES as INDEX_CHOICES, resolve as resolve_index_dtype

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "assets" / "model"
KINDS = ("niah", "kv", "continue", "mv", "mq")
KV_FORMATS = ("json", "csv", "config", "code")


def _distinct(draw, n: int) -> list:
    out: list = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out


# --------------------------------------------------------------------------------------------- cases
def build_case(kind: str, rng: random.Random, pool, tok, length: int, depths, variant: str = "eval",
               values: str = "number", keys: int = 1, formats: tuple[str, ...] = KV_FORMATS, start: int = 0):
    """A haystack of about ``length`` prompt tokens with one item per depth: (haystack text, [QA]).
    ``values``: the niah value format (runtime/tasks.py make_value: number, code, words) or "mixed".
    ``keys`` > 1 (niah, mv, mq; one depth): that many facts of one template with different keys (RULER's
    multi-key, multi-value and multi-query needles); the asked or first one sits at the depth, the others
    at random depths. ``formats``: the kv blocks' formats, in turn from the ``start``-th."""
    if kind in ("mv", "mq") or (kind == "niah" and keys > 1):
        if len(depths) != 1:
            raise ValueError(f"{kind} with {keys} keys plants one group per haystack: use --per-haystack one")
        return _build_group(kind, rng, pool, tok, length, depths[0], variant, values, keys)
    if kind == "niah":
        used, items = set(), []
        while len(items) < len(depths):
            attr, ent = rng.choice(T.ATTRIBUTES), T.entity(rng, variant)
            if (attr, ent) in used:
                continue
            used.add((attr, ent))
            items.append((attr, ent, T.make_value(rng, variant, None if values == "mixed" else values)))
        sents = [T.niah_sentence(*it) for it in items]
        planted = [s for s, _ in sents]
        questions = [T.niah_question(a, e) for a, e, _ in items]
    elif kind == "kv":
        used, blocks = set(), []
        while len(blocks) < len(depths):
            block, fmt, pairs = T.kv_block(rng, variant, 6, formats[(start + len(blocks)) % len(formats)])
            keys = {k.lower() for k, _, _ in pairs}
            if keys & used:
                continue
            used |= keys
            blocks.append((block, fmt, pairs))
        planted = [b for b, _, _ in blocks]
        questions = []
    elif kind == "continue":
        planted, questions = [], []
    else:
        raise ValueError(f"unknown eval kind {kind!r}; expected one of {KINDS}")
    q_tokens = max((len(tok.encode(q)) for q in questions), default=30)
    overhead = sum(len(tok.encode(p)) + 1 for p in planted) + q_tokens + 6
    hay = pool.text(max(64, length - overhead), rng)
    qas = []
    if kind == "continue":
        for d in depths:
            found = T.find_snippet(hay, rng, d)
            if found is None:
                continue
            snip, cont, off = found
            qas.append(T.QA(T.CONTINUE_QUESTION.format(snippet=snip), cont, (off, off + len(cont)), d, kind))
        return hay, qas
    text, spans = T.plant(hay, list(zip(depths, planted)))
    if kind == "niah":
        for (attr, ent, val), (s, e), (_, voff), d, q in zip(items, spans, sents, depths, questions):
            qas.append(T.QA(q, val, (s + voff, s + voff + len(val)), d, kind))
    else:
        for (block, fmt, pairs), (s, e), d in zip(blocks, spans, depths):
            key, val, off = pairs[rng.randrange(len(pairs))]
            qas.append(T.QA(T.KV_QUESTIONS[fmt].format(key=key), val, (s + off, s + off + len(val)), d, kind,
                            fmt=fmt))
    return text, qas


def _build_group(kind: str, rng: random.Random, pool, tok, length: int, depth: float, variant: str,
                 values: str, keys: int):
    """One haystack, one question over a group of same-template facts:
    niah (keys K): K keys, one value each, one asked -- the others are distractors;
    mv (keys V): one key, V values ("One of the ... is"), all asked;
    mq (keys Q): Q keys, all asked at once, answered in the asked order."""
    fmt = None if values == "mixed" else values
    attr = rng.choice(T.ATTRIBUTES)
    n = max(keys, 2) if kind in ("mv", "mq") else keys
    if kind == "mv":
        ents = [T.entity(rng, variant)] * n
        vals = _distinct(lambda: T.make_value(rng, variant, fmt), n)
        sents = [T.mv_sentence(attr, ents[0], v) for v in vals]
        question = T.mv_question(attr, ents[0])
    else:
        ents = _distinct(lambda: T.entity(rng, variant), n)
        vals = _distinct(lambda: T.make_value(rng, variant, fmt), n)
        sents = [T.niah_sentence(attr, e, v) for e, v in zip(ents, vals)]
        question = T.niah_question(attr, ents[0]) if kind == "niah" else T.mq_question(attr, ents)
    overhead = sum(len(tok.encode(x)) + 1 for x, _ in sents) + len(tok.encode(question)) + 6
    hay = pool.text(max(64, length - overhead), rng)
    place = [depth] + [rng.random() for _ in range(n - 1)]
    text, spans = T.plant(hay, [(d, x) for d, (x, _) in zip(place, sents)])
    vspans = [(s + off, s + off + len(v)) for (s, _), (_, off), v in zip(spans, sents, vals)]
    if kind == "niah":
        return text, [T.QA(question, vals[0], vspans[0], depth, kind, distractor_chars=tuple(vspans[1:]))]
    return text, [T.QA(question, ", ".join(vals), vspans[0], depth, kind, more_chars=tuple(vspans[1:]),
                       values=tuple(vals))]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    step = 4096
    while i + step <= n and a[i:i + step] == b[i:i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def answer_ids(model, tok, prompt: list[int], cache, max_new_tokens: int, capture: Capture | None = None,
               chunk: int = 8192) -> list[int]:
    """Greedy answer ids to a chat `prompt` continuing `cache`, through the generation core with the app's
    stop ids (EOS and <User>), so a figure measured here is what the app would answer."""
    gen = generate(model, prompt, cache, GenerationParams(max_new_tokens=max_new_tokens, capture=capture is not None),
                   stop_ids={tok.eos_id, tok.user_id}, chunk_size=chunk, capture=capture)
    return gen.tokens


def _selection(model, capture: Capture, query_pos: int, value_tokens: tuple[int, int], *more):
    """(share of CSA layers whose top-k held an entry covering the value, best 1-based rank or None per layer).
    With `more` value spans (multi-value / multi-query): the share over every (value, layer), and per layer
    the best rank of any of them."""
    per = span_ranks(capture, model.config, query_pos, [value_tokens, *more])
    flat = [r for ranks in per for r in ranks]
    recall = sum(r is not None for r in flat) / len(flat) if flat else float("nan")
    ranks = [min((r for r in col if r is not None), default=None) for col in zip(*per)]
    return recall, ranks


def evaluate(kind: str, model_dir=None, lengths=(4096,), depths=(0.0, 0.25, 0.5, 0.75, 1.0), seed: int = 0,
             haystack_paths=None, n: int = 4, chunk: int = 8192, model=None, tokenizer=None,
             max_new_tokens: int | None = None, progress=None, pool=None, values: str = "number",
             per_haystack: str = "one", index_dtype: str | torch.dtype | None = "auto", keys: int | None = None,
             formats: tuple[str, ...] = KV_FORMATS, sources: tuple[str, ...] | None = None) -> list[dict]:
    """One dict per (length, depth): kind, length, depth, n, correct, accuracy, recall, rank, first, tokens
    (mean prompt length), seconds (mean wall time per haystack of that length: prefill + all its questions),
    seed, examples (question, answer, output, ok, recall, ranks, first, prompt tokens).
    per_haystack "all": each haystack holds one item per depth (the others are distractors for each
    question); "one": every depth gets haystacks of its own with a single item (classic NIAH).
    keys: niah with K > 1 plants K same-template facts per haystack and asks one (multi-key); mv plants one
    key with that many values (default 4) and asks all; mq plants that many keys (default 2) and asks them
    at once. mv and mq are scored as sets of values (runtime/tasks.py values_match).
    formats: kv block formats, in turn (cells also report accuracy per format).
    sources: held-out haystack text of these runtime/haystacks.py sources only (a kind of text: stdlib =
    source code, pydoc = manuals, doc = package documentation, gcide = a dictionary); default all.
    index_dtype: the indexer keys' dtype, "auto" as the engine chooses it (runtime/isa.py)."""
    from .cluster import lead_if_distributed
    from .model import load_model
    from .tokenizer import Tokenizer

    if kind not in KINDS:
        raise ValueError(f"unknown eval kind {kind!r}; expected one of {KINDS}")
    model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL
    if model is None:  # under torchrun: rank 0 drives the ranks' shards (runtime/cluster.py)
        model = lead_if_distributed(load_model(model_dir))
    model.eval()
    if tokenizer is None:
        tokenizer = Tokenizer.from_file(model_dir / "tokenizer.json") if (model_dir / "tokenizer.json").is_file() \
            else Tokenizer.default()
    tok = tokenizer
    depths = [float(d) for d in depths]
    if pool is None:
        if haystack_paths:
            pool = T.TokenPool.from_files(haystack_paths, tok)
        else:
            need = int(max(lengths) * 3.6) + 500_000
            pool = T.TokenPool.corpus("heldout", need, tok, sources=sources)
    index_dtype = resolve_index_dtype(index_dtype, model.device)  # after the pool: its manifest check comes first
    cells = {(L, d): [] for L in lengths for d in depths}
    secs = {L: 0.0 for L in lengths}
    if per_haystack not in ("all", "one"):
        raise ValueError(f"per_haystack must be 'all' or 'one', got {per_haystack!r}")
    keys = keys_for(kind, keys)
    if keys < 1:
        raise ValueError(f"keys must be at least 1, got {keys}")
    bad = [f for f in formats if f not in KV_FORMATS]
    if bad or not formats:
        raise ValueError(f"kv formats must be among {KV_FORMATS}, got {list(formats)}")
    groups = [depths] if per_haystack == "all" else [[d] for d in depths]
    for L in lengths:
        for i, group in ((i, g) for i in range(n) for g in groups):
            rng = random.Random(f"{seed}:{kind}:{L}:{i}" + ("" if per_haystack == "all" else f":{group[0]}"))
            t0 = time.time()
            hay, qas = build_case(kind, rng, pool, tok, L, group, values=values, keys=keys, formats=tuple(formats),
                                  start=i)  # kv: formats in turn over the haystacks too
            prompts = []
            for qa in qas:
                content = hay + "\n\n" + qa.question
                ids = tok.render_chat([{"role": "user", "content": content}])
                cids, offsets = tok.encode_with_offsets(content)
                qa.value_tokens = T.char_span_to_tokens(offsets, qa.value_chars, 2)
                qa.more_tokens = tuple(T.char_span_to_tokens(offsets, c, 2) for c in qa.more_chars)
                qa.distractor_tokens = tuple(T.char_span_to_tokens(offsets, c, 2) for c in qa.distractor_chars)
                prompts.append(ids)
            if not prompts:
                continue
            P = min(_common_prefix(prompts[0], p) for p in prompts) if len(prompts) > 1 else len(prompts[0]) - 1
            P = min(P, min(len(p) for p in prompts) - 1)
            cache = model.new_cache(index_dtype=index_dtype)
            prefill(model, prompts[0][:P], cache, chunk_size=chunk)
            shared = cache.mark()  # every question continues the shared prefix: rewind, never re-prefill
            for qa, ids in zip(qas, prompts):
                cache.rewind(shared)
                cap = Capture()
                n_ans = len(tok.encode(qa.answer))
                out = answer_ids(model, tok, ids[P:], cache, max_new_tokens or n_ans + 8, cap, chunk)
                text = tok.decode(out, skip_special_tokens=True)
                ok = T.values_match(text, qa.values) if qa.values else text.strip() == qa.answer.strip()
                rec, ranks = _selection(model, cap, len(ids) - 1, qa.value_tokens, *qa.more_tokens)
                # distractor check: does the asked item outrank every other planted item in the selection?
                others = [_selection(model, cap, len(ids) - 1, o.value_tokens)[1] for o in qas if o is not qa]
                others += [_selection(model, cap, len(ids) - 1, t)[1] for t in qa.distractor_tokens]
                best = [r for r in ranks if r is not None]
                other_best = [r for rs in others for r in rs if r is not None]
                first = bool(best) and (not other_best or min(best) < min(other_best))
                cells[(L, qa.depth)].append(dict(question=qa.question, answer=qa.answer, output=text, ok=ok,
                                                 recall=rec, ranks=ranks, first=first, tokens=len(ids),
                                                 **({"format": qa.fmt} if qa.fmt else {})))
                del cap
            secs[L] += time.time() - t0
            if progress is not None:
                progress(f"{kind} L={L} haystack {i + 1}/{n} (depths {group}): "
                         f"{sum(e['ok'] for d in group for e in cells[(L, d)][-1:])}/{len(qas)} right, "
                         f"{time.time() - t0:.1f}s")
            del cache
    results = []
    for L in lengths:
        for d in depths:
            ex = cells[(L, d)]
            hits = [r for e in ex for r in e["ranks"] if r is not None]
            recs = [e["recall"] for e in ex if not math.isnan(e["recall"])]
            results.append(dict(
                kind=kind, length=L, depth=d, n=len(ex), correct=sum(e["ok"] for e in ex),
                accuracy=(sum(e["ok"] for e in ex) / len(ex)) if ex else None,
                recall=(sum(recs) / len(recs)) if recs else None,
                rank=(sum(hits) / len(hits)) if hits else None,
                first=(sum(e["first"] for e in ex) / len(ex)) if ex else None,
                tokens=round(sum(e["tokens"] for e in ex) / len(ex)) if ex else None,
                seconds=round(secs[L] / max(1, n * len(groups)), 2), seed=seed, per_haystack=per_haystack,
                keys=keys, **({"by_format": _by_format(ex)} if kind == "kv" else {}),
                **({"sources": list(sources)} if sources else {}), examples=ex))
    return results


def _by_format(examples: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for e in examples:
        c = out.setdefault(e["format"], {"n": 0, "correct": 0})
        c["n"] += 1
        c["correct"] += int(e["ok"])
    for c in out.values():
        c["accuracy"] = c["correct"] / c["n"]
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------- CLI
def _int_list(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        p = part.strip().lower()
        mult = 1
        if p.endswith("k"):
            mult, p = 1024, p[:-1]
        elif p.endswith("m"):
            mult, p = 1024 * 1024, p[:-1]
        out.append(int(float(p) * mult))
    return out


def _float_list(s: str) -> list[float]:
    vals = [float(x) for x in s.split(",") if x.strip()]
    bad = [v for v in vals if not 0.0 <= v <= 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {bad}")
    return vals


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("kind", choices=KINDS, help="niah: needle facts; kv: key-value lookup in JSON/CSV/config/"
                                                    "code blocks; continue: continue a quoted snippet verbatim; "
                                                    "mv: all the values of one key (multi-value); mq: several "
                                                    "keys asked at once (multi-query)")
    parser.add_argument("--keys", type=int, default=None,
                        help="niah: same-template facts per haystack, one asked (multi-key; default 1); mv: values "
                             "of the one key (default 4); mq: keys asked at once (default 2)")
    parser.add_argument("--formats", default=",".join(KV_FORMATS),
                        help=f"kv: block formats, comma-separated, used in turn (default: all of "
                             f"{','.join(KV_FORMATS)})")
    parser.add_argument("--lengths", type=_int_list, default=[4096, 32768],
                        help="comma-separated prompt lengths in tokens (4096, 32k, 1M accepted)")
    parser.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="comma-separated item depths in [0, 1] (0 = start of the haystack)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--values", choices=("number", "code", "words", "mixed"), default="number",
                        help="niah value format: number = 3-8 digits, as RULER's passkeys (default); code = "
                             "'QX-4471-B'; words = 'falcon-12'; mixed = 60/25/15%% of those")
    parser.add_argument("--per-haystack", choices=("one", "all"), default=None,
                        help="one: a haystack per depth with a single planted item (classic needle in a "
                             "haystack; default); all: one haystack holds an item per depth, so each question "
                             "has the other items as distractors (multi-key, harder). With --haystack-dir: all "
                             "(default) puts every needle in one context, one gives each its own prefill")
    parser.add_argument("--sources", default=None, metavar="S[,S]",
                        help="held-out haystacks of these kinds only: stdlib (source code), pydoc (manuals), doc "
                             "(package documentation), gcide (a dictionary); default: all of them, interleaved")
    parser.add_argument("--haystack", action="extend", nargs="+", default=None, metavar="PATH",
                        help="files or folders to cut haystacks from (default: the held-out corpus split)")
    parser.add_argument("--haystack-dir", default=None, metavar="DIR",
                        help="niah in your own documents (runtime/probe.py): one needle per (document, depth) "
                             "planted in memory (the files are not changed), asked through the app's path; prints "
                             "a document x depth grid and what the model can and cannot do there (--json: one "
                             "object). --lengths and --n do not apply")
    parser.add_argument("--documents", default=None, metavar="N|NAMES",
                        help="with --haystack-dir: plant in N documents spread over the corpus, or in the named "
                             "ones (comma-separated, a path tail such as b.md is enough; default: all)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder (default: assets/model)")
    parser.add_argument("--n", type=int, default=4, help="haystacks per length (each holds one item per depth)")
    parser.add_argument("--chunk", type=int, default=8192, help="prefill chunk size in tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--index-dtype", choices=INDEX_CHOICES, default="auto",
                        help="the lightning indexer's keys; auto = the engine's choice for this CPU (runtime/isa.py)")
    parser.add_argument("--json", action="store_true", help="one JSON object per cell on stdout")
    parser.add_argument("--examples", action="store_true", help="with --json, include every question and output")
    parser.add_argument("--include", nargs="+", default=[], metavar="JSONL",
                        help="earlier --json outputs to merge into the table and the plot (cells of this kind)")
    parser.add_argument("--plot", default=None, metavar="SVG",
                        help="write an exact-match heatmap (length x depth, with selection recall) to this file")
    parser.add_argument("--title", default=None, help="the plot's title (default: kind and what the cells show)")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: render --include files only (table, --plot)")
    return parser


def load_results(paths, kind: str | None = None) -> list[dict]:
    """Cells from --json output files (one JSON object per line)."""
    out = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                r = json.loads(line)
                if kind is None or r.get("kind") == kind:
                    out.append(r)
    return out


def svg_heatmap(results: list[dict], title: str) -> str:
    """Exact-match accuracy per (length, depth) as a colour grid; each cell also prints its recall and n."""
    lengths = sorted({r["length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    cell = {(r["length"], r["depth"]): r for r in results}
    cw, ch, left, top = 92, 46, 96, 56
    w, h = max(left + cw * len(depths) + 20, 720), top + ch * len(lengths) + 52  # room for title and key
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
         'font-family="system-ui, sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{left}" y="22" font-size="14" font-weight="600">{html.escape(title)}</text>',
         f'<text x="{left}" y="40" fill="#555">needle depth (0 = start of the haystack) &#8594;</text>']
    for j, d in enumerate(depths):
        o.append(f'<text x="{left + j * cw + cw / 2}" y="{top - 4}" text-anchor="middle">{d:.2f}</text>')
    for i, L in enumerate(lengths):
        y = top + i * ch
        label = f"{L // 1024}k" if L < 1 << 20 else f"{L / (1 << 20):g}M"
        o.append(f'<text x="{left - 8}" y="{y + ch / 2 + 4}" text-anchor="end">{label} tokens</text>')
        for j, d in enumerate(depths):
            r, x = cell.get((L, d)), left + j * cw
            if r is None or r.get("accuracy") is None:
                o.append(f'<rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" fill="#eee"/>')
                continue
            a = r["accuracy"]
            red, green = int(230 - 190 * a), int(80 + 140 * a)  # red (0) to green (1)
            o.append(f'<rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" fill="rgb({red},{green},90)"/>')
            rec = "-" if r.get("recall") is None else f"{r['recall']:.2f}"
            o.append(f'<text x="{x + cw / 2 - 1}" y="{y + 19}" text-anchor="middle" fill="white" font-weight="600">'
                     f'{a:.2f}</text>')
            o.append(f'<text x="{x + cw / 2 - 1}" y="{y + 35}" text-anchor="middle" fill="white" font-size="10">'
                     f'recall {rec} · n {r["n"]}</text>')
    o.append(f'<text x="{left}" y="{h - 14}" fill="#555">cell: exact-match accuracy (colour, large) and CSA '
             f'selection recall of the needle\'s entry</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def format_table(results: list[dict]) -> str:
    head = (f"{'kind':8s} {'keys':>4s} {'length':>8s} {'depth':>5s} {'n':>3s} {'acc':>6s} {'recall':>6s} "
            f"{'rank':>5s} {'first':>5s} {'tokens':>8s} {'s/hay':>7s}")
    lines = [head, "-" * len(head)]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    formats: dict[str, list[int]] = {}
    for r in results:
        lines.append(f"{r['kind']:8s} {r.get('keys', 1):4d} {r['length']:8d} {r['depth']:5.2f} {r['n']:3d} "
                     f"{f(r['accuracy'], '6.2f')} {f(r['recall'], '6.2f')} {f(r['rank'], '5.1f')} "
                     f"{f(r.get('first'), '5.2f')} {f(r['tokens'], '8d')} {r['seconds']:7.1f}")
        for name, c in (r.get("by_format") or {}).items():
            acc = formats.setdefault(name, [0, 0])
            acc[0], acc[1] = acc[0] + c["correct"], acc[1] + c["n"]
    if formats:
        lines.append("by format: " + ", ".join(f"{k} {c}/{n} ({c / n:.2f})" for k, (c, n) in formats.items()))
    return "\n".join(lines)


def keys_for(kind: str, asked: int | None) -> int:
    """--keys as evaluate() takes it: RULER's defaults where not given (mv 4 values, mq 2 keys, else 1)."""
    return asked if asked is not None else {"mv": 4, "mq": 2}.get(kind, 1)


def main_eval(args) -> int:
    if getattr(args, "haystack_dir", None):
        from .probe import main_probe

        return main_probe(args)
    if getattr(args, "documents", None):
        from .errors import EngineError

        raise EngineError("--documents picks documents of --haystack-dir; give that folder too")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)
    results = [] if args.render_only else evaluate(
        args.kind, args.model, args.lengths, args.depths, args.seed, args.haystack, n=args.n, chunk=args.chunk,
        progress=progress, values=args.values, per_haystack=args.per_haystack or "one",
        index_dtype=getattr(args, "index_dtype", "auto"), keys=getattr(args, "keys", None),
        formats=tuple(f.strip() for f in getattr(args, "formats", ",".join(KV_FORMATS)).split(",") if f.strip()),
        sources=tuple(x.strip() for x in args.sources.split(",") if x.strip()) if getattr(args, "sources", None)
        else None)
    if args.plot:
        merged = {(r["length"], r["depth"]): r for r in load_results(args.include, args.kind) + results}
        cells = sorted(merged.values(), key=lambda r: (r["length"], r["depth"]))
        Path(args.plot).write_text(svg_heatmap(cells, args.title or f"{args.kind}: exact match by context length "
                                                                       f"and depth"))
        print(f"wrote {args.plot}", file=sys.stderr)
        if args.render_only:
            results = cells
    if args.json:
        for r in results:
            if not args.examples:
                r = {k: v for k, v in r.items() if k != "examples"}
            print(json.dumps(r), flush=True)
    else:
        print(format_table(results))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(ap)
    return main_eval(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
