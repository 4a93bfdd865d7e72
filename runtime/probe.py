"""Needles in the user's own documents: plant synthetic facts into a loaded corpus (in memory; the files on
disk are never touched), ask for each through the app's path, and report a document x depth grid of what
the model found and what its sparse attention selected.

    grid = needle_grid(engine, corpus, depths=(0, 0.5, 1), documents=3, seed=0)
    print(grid.format_table())          # the grid, then grid.summary(): what it can and cannot do here
    grid.to_dict()                      # JSON-friendly, every cell with its output and selection
    python -m runtime eval niah --haystack-dir DIR [--depths 0,0.5,1] [--documents N|a.md,b.md] [--json]

Planting (`plant_needles`): one needle per (document, depth) cell, in the format the shipped model was
trained on (runtime/tasks.py: the line ``The {attribute} for the {entity} is {value}.``, asked as ``What
is the {attribute} for the {entity}?``; entities from the evaluation vocabulary, never seen in training),
as a line of its own at the line start nearest `depth` of the document's text (0 = before the first line,
1 = after the last). The planted documents are copies: the returned Corpus holds new Documents, the input
Corpus and the files stay as they were. Keys whose entity occurs in the corpus and values that occur in it
are drawn again, so each question has exactly one answer in the context.

Asking (`needle_grid`): per_context="all" (the default) plants every needle and prefills the planted
corpus once through a Session (runtime/session.py: the chat preamble + the corpus layout, the engine's
chunk size, indexer dtype, limits and lock); each question then continues the cache from the corpus mark
exactly as a chat's first question does (Conversation.turn_ids, the generation core of runtime/generate.py,
the app's stop ids, greedy) and the cache is rewound to the mark after it. So every question has the
other needles in its context as distractors (facts of the same form with other keys), as in `eval niah
--per-haystack all`. per_context="one" gives each needle a context of its own (one prefill per needle):
the classic single needle, in these documents. Answers are cut at the value's length + 8 tokens (as in
eval niah); greedy decoding makes the tokens before the cut those the page would stream.

Per cell: exact match (stripped output == value), the output, the needle's place (document, line, context
position), and the selection evidence of the first answer query (the <Assistant> position) from a
runtime.Capture, as `eval niah` reads it: `recall` (share of CSA layers whose lightning-indexer top-k held
an entry covering the value; `selected` = at least one did), `rank` (best 1-based rank of such an entry
by index score), `in_window` (the value lies in that query's sliding window, where it is read with no
selection at all), `first` (the asked needle's entry outranked every other needle's; "all" mode only) and,
for a miss, its kind (MISS_KINDS).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from . import tasks as T
from .corpus import Corpus, ingest
from .engine import Engine
from .errors import Cancelled, EngineError
from .generate import Generation, GenerationParams, prefill
from .introspect import Capture, span_ranks

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MODES = ("all", "one")
VALUES = ("number", "code", "words", "mixed")
MISS_KINDS = {  # in the order a miss is classified
    "another_fact": "answered another planted fact's value, whole or in part (picked the wrong key)",
    "copy_slip": "a partial or slipped copy of the value (starts like it or is an edit or two away)",
    "corpus_value": "answered something already in the documents, whole or in part (e.g. a fact of the same "
                    "form that was there before planting)",
    "not_selected": "the needle's entry was not in the CSA top-k and not in the sliding window",
    "wrong": "some other answer",
}
MAX_LISTED = 12  # misses named one by one in the summary


@dataclass(frozen=True)
class Needle:
    document: str  # the document's name in the corpus
    doc_index: int  # its index in corpus.documents
    depth: float  # asked-for depth in the document's text: 0 = before the first line, 1 = after the last
    line: int  # 1-based line of the needle in the planted document
    attribute: str
    entity: str
    value: str
    sentence: str  # the planted line
    question: str
    char_span: tuple[int, int]  # the value's characters in the planted document's text

    @property
    def key(self) -> str:
        return f"{self.attribute} for the {self.entity}"


@dataclass(frozen=True)
class _Spec:
    doc_index: int
    depth: float
    attribute: str
    entity: str
    value: str


@dataclass(frozen=True)
class ProbeProgress:
    stage: str  # "prefill" (done / total in tokens) or "ask" (done / total in questions, all contexts)
    done: int
    total: int
    context: int  # 1-based context being prefilled or asked ("one" mode has a context per needle)
    contexts: int


@dataclass
class NeedleCell:
    """One (document, depth) cell: the needle, what the model answered and what it selected."""
    needle: Needle
    output: str  # the answer text, special tokens skipped
    answer_ids: list[int]  # the generated ids (the stop id not included)
    stop_reason: str
    ok: bool  # exact match of the stripped output
    value_tokens: tuple[int, int]  # context positions [a, b) of the value's tokens
    context_tokens: int  # length of the prefilled context (preamble + planted corpus layout)
    recall: float | None  # share of CSA layers whose top-k held the needle's entry (None: no CSA layer)
    ranks: list[int | None]  # per CSA layer, the best 1-based rank by index score (None: not selected)
    in_window: bool  # the value was in the first answer query's sliding window
    first: bool | None  # the asked needle outranked every other needle (None: alone in its context)
    miss: str | None = None  # a MISS_KINDS key, None when ok
    confused_with: int | None = None  # index in grid.cells of the needle whose value was answered
    corpus_match: tuple[str, int, str] | None = None  # (document, line, text) of what was answered instead

    @property
    def document(self) -> str:
        return self.needle.document

    @property
    def depth(self) -> float:
        return self.needle.depth

    @property
    def selected(self) -> bool:
        return bool(self.recall)

    @property
    def rank(self) -> int | None:
        hits = [r for r in self.ranks if r is not None]
        return min(hits) if hits else None

    @property
    def position(self) -> int:
        return self.value_tokens[0]

    @property
    def context_depth(self) -> float:
        return self.position / max(1, self.context_tokens)


@dataclass
class NeedleGrid:
    """The document x depth grid of a needle test (module docstring); cells document-major, depth-minor."""
    depths: list[float]
    documents: list[str]  # planted documents, in corpus (context) order
    cells: list[NeedleCell]
    per_context: str  # "all" or "one"
    seed: int
    values: str
    corpus_documents: int  # documents in the corpus (planted or not)
    index_topk: int
    timings: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.cells)

    @property
    def found(self) -> int:
        return sum(c.ok for c in self.cells)

    @property
    def selected(self) -> int:
        return sum(c.selected for c in self.cells)

    @property
    def context_tokens(self) -> int:
        return max((c.context_tokens for c in self.cells), default=0)

    def cell(self, document: str, depth: float) -> NeedleCell:
        return self.cells[self.documents.index(document) * len(self.depths) + self.depths.index(depth)]

    def rows(self) -> list[tuple[str, list[NeedleCell]]]:
        """(document, its cells in depth order) in context order: the grid as rows."""
        k = len(self.depths)
        return [(d, self.cells[i * k:(i + 1) * k]) for i, d in enumerate(self.documents)]

    # ------------------------------------------------------------------------------------ words
    def summary(self) -> list[str]:
        """Plain sentences: what was planted, what the model found and selected, what it missed and why."""
        n, names = self.total, _short_names(self.documents)
        short = dict(zip(self.documents, names))
        where = lambda c: f"{short[c.document]} @{c.depth:.2f}"
        out = []
        planted = (f"{len(self.documents)} of the corpus's {self.corpus_documents} documents"
                   if len(self.documents) < self.corpus_documents else f"{len(self.documents)} documents")
        if self.per_context == "all":
            out.append(f"Planted {n} synthetic facts, one per (document, depth) cell, in {planted}, all in one "
                       f"{self.context_tokens:,}-token context: each question had the other {n - 1} as "
                       "distractors (facts of the same form with other keys).")
        else:
            out.append(f"Planted {n} synthetic facts, one per (document, depth) cell, in {planted}, each in a "
                       f"context of its own (up to {self.context_tokens:,} tokens): no distractors.")
        sel = f"the needle's entry was in the CSA top-{self.index_topk} for {self.selected} of {n}"
        ranked1 = sum(c.rank == 1 for c in self.cells)
        if self.selected:
            sel += f" (ranked first in {ranked1})"
        window = sum(c.in_window and not c.selected for c in self.cells)
        if window:
            sel += (f"; {window} more sat in the question's sliding window, where the model reads them "
                    "without any selection")
        out.append(f"Found {self.found} of {n} (exact match); {sel}.")
        if self.per_context == "all" and n > 1:
            firsts = sum(bool(c.first) for c in self.cells)
            out.append(f"The asked fact's entry outranked the other planted facts' entries in {firsts} of {n}.")
        by_doc = ", ".join(f"{short[d]} {sum(c.ok for c in cs)}/{len(cs)}" for d, cs in self.rows())
        by_depth = ", ".join(f"{x:.2f} {sum(c.ok for c in self.cells if c.depth == x)}/{len(self.documents)}"
                             for x in self.depths)
        out.append(f"By document: {by_doc}. By depth: {by_depth}.")
        misses = [c for c in self.cells if not c.ok]
        if not misses:
            out.append("The model can find and copy a planted fact from every document and depth tried here.")
        else:
            hint = "; per_context='one', or --per-haystack one, asks each alone" if self.per_context == "all" else ""
            k = {kind: sum(c.miss == kind for c in misses) for kind in MISS_KINDS}
            were = lambda n, one, many: f"{n} {one if n == 1 else many}"
            why = {"another_fact": "tell the planted facts apart ("
                                   f"{were(k['another_fact'], 'answer was', 'answers were')} another planted fact's "
                                   f"value, whole or in part{hint})",
                   "copy_slip": f"copy every value exactly ({were(k['copy_slip'], 'copy', 'copies')} cut short or "
                                "slipped)",
                   "corpus_value": f"tell the planted fact from what the documents already hold "
                                   f"({were(k['corpus_value'], 'answer', 'answers')} taken from their own text)",
                   "not_selected": f"find every fact ({were(k['not_selected'], 'needle', 'needles')} neither "
                                   "selected nor in the sliding window)",
                   "wrong": f"answer every question with a value ({were(k['wrong'], 'other answer', 'other answers')})"}
            verdict = "It cannot reliably, on this corpus: " + "; ".join(why[x] for x in MISS_KINDS if k[x]) + "."
            if all(c.selected or c.in_window for c in self.cells):
                verdict += (" Its sparse attention reached every needle (selected, or in the sliding window), so "
                            "no miss is for want of selection.")
            out.append(verdict)
            listed = []
            for c in misses[:MAX_LISTED]:
                what = MISS_KINDS[c.miss].split(" (")[0].split(",")[0]
                if c.confused_with is not None:
                    other = self.cells[c.confused_with]
                    what = (f"the value planted at {where(other)}" if c.output.strip() == other.needle.value
                            else f"part of {other.needle.value}, planted at {where(other)}")
                elif c.corpus_match is not None:
                    doc, line, found = c.corpus_match
                    at = f"{_short_names(self.documents + [doc])[-1]} line {line}"
                    what = f"from {at}" if found == c.output.strip() else f"part of {found}, from {at}"
                listed.append(f"{where(c)} (line {c.needle.line}, {c.context_depth:.0%} into the context): "
                              f"answered {c.output.strip()[:40]!r} for {c.needle.value} ({what})")
            more = f"; and {len(misses) - MAX_LISTED} more" if len(misses) > MAX_LISTED else ""
            out.append("Misses: " + "; ".join(listed) + more + ".")
        out.append("These are synthetic facts in the retrieval format the shipped model was trained on; the grid "
                   "measures finding and copying such a fact in these documents, not answering other questions "
                   "about them (a model not trained on the format may answer in other words, which counts as a "
                   "miss).")
        return out

    def format_table(self) -> str:
        """The grid as plain text (rows: documents in context order; columns: depths), then the summary."""
        names = _short_names(self.documents)
        w = min(max([len(n) for n in names] + [8]), 40)
        head = f"{'document':<{w}}  " + "  ".join(f"{'@' + format(x, '.2f'):<9}" for x in self.depths)
        lines = [head, "-" * len(head)]
        for name, (_, cells) in zip(names, self.rows()):
            name = name if len(name) <= w else "…" + name[-(w - 1):]
            lines.append(f"{name:<{w}}  " + "  ".join(f"{_cell_text(c):<9}" for c in cells))
        lines.append("")
        lines.append("cell: ok / MISS = exact match of the planted value; then the needle's entry in the CSA "
                     f"top-{self.index_topk}: r1 = ranked first by index score, '-' = not selected, win = not "
                     "selected but in the question's sliding window")
        lines.append("")
        lines += self.summary()
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-friendly: the settings, counts, summary sentences and every cell."""
        cells = []
        for c in self.cells:
            n = c.needle
            other = None if c.confused_with is None else self.cells[c.confused_with]
            cells.append({
                "document": n.document, "depth": n.depth, "line": n.line, "question": n.question,
                "value": n.value, "sentence": n.sentence, "output": c.output, "ok": c.ok,
                "selected": c.selected, "recall": c.recall, "rank": c.rank, "ranks": c.ranks,
                "in_window": c.in_window, "first": c.first, "miss": c.miss,
                "confused_with": None if other is None else {"document": other.document, "depth": other.depth},
                "corpus_match": None if c.corpus_match is None else dict(zip(("document", "line", "text"),
                                                                              c.corpus_match)),
                "position": c.position, "context_depth": round(c.context_depth, 4),
                "value_tokens": list(c.value_tokens), "char_span": list(n.char_span),
                "context_tokens": c.context_tokens, "stop_reason": c.stop_reason, "answer_ids": c.answer_ids})
        return {"per_context": self.per_context, "seed": self.seed, "values": self.values,
                "depths": self.depths, "documents": self.documents, "corpus_documents": self.corpus_documents,
                "context_tokens": self.context_tokens, "index_topk": self.index_topk, "total": self.total,
                "found": self.found, "selected": self.selected,
                "in_window": sum(c.in_window for c in self.cells), "summary": self.summary(),
                "timings": {k: round(v, 4) if isinstance(v, float) else v for k, v in self.timings.items()},
                "cells": cells}


def _cell_text(c: NeedleCell) -> str:
    sel = f"r{c.rank}" if c.rank is not None else "win" if c.in_window else "-"
    return f"{'ok' if c.ok else 'MISS'} {sel}"


def _short_names(names: Sequence[str]) -> list[str]:
    """Names without the folders they all share (keeping at least each base name)."""
    parts = [n.split("/") for n in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ["/".join(p[common:]) for p in parts]


# --------------------------------------------------------------------------------------------- planting
def resolve_depths(depths: int | Sequence[float]) -> list[float]:
    """A list of depths in [0, 1]; an int n gives n evenly spaced ones (1 gives [0.5])."""
    if isinstance(depths, int):
        if depths < 1:
            raise EngineError(f"need at least one depth, got {depths}")
        return [0.5] if depths == 1 else [round(i / (depths - 1), 6) for i in range(depths)]
    out = [float(d) for d in depths]
    if not out or any(not 0.0 <= d <= 1.0 for d in out):
        raise EngineError(f"depths must be one or more numbers in [0, 1], got {list(depths)}")
    if len(set(out)) != len(out):
        raise EngineError(f"depths repeat: {out}")
    return out


def select_documents(corpus: Corpus, documents: int | Sequence[str] | None) -> list[int]:
    """Indices (in corpus order) of the documents to plant in. None: all; an int N: N spread evenly over the
    corpus (the first and the last included); names: those, each by its full name or a unique path tail
    ('b.md', 'docs/b.md')."""
    names = [d.name for d in corpus.documents]
    if not names:
        raise EngineError("the corpus holds no documents")
    if documents is None:
        return list(range(len(names)))
    if isinstance(documents, int):
        if documents < 1:
            raise EngineError(f"need at least one document, got {documents}")
        k, n = min(documents, len(names)), len(names)
        return [0] if k == 1 else sorted({int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)})
    out = []
    for want in documents:
        hits = [i for i, nm in enumerate(names) if nm == want] or \
               [i for i, nm in enumerate(names) if nm.endswith("/" + want.strip("/"))]
        if not hits:
            shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
            raise EngineError(f"no document {want!r} in the corpus (it holds {shown})")
        if len(hits) > 1:
            raise EngineError(f"{want!r} names {len(hits)} documents ({', '.join(names[i] for i in hits[:4])}); "
                              "give more of its path")
        out.append(hits[0])
    return sorted(set(out))


def _draw(corpus: Corpus, doc_indices: Sequence[int], depths: Sequence[float], seed: int, values: str) -> list[_Spec]:
    """One key and value per (document, depth): keys unique, values unique, neither occurring in the corpus."""
    if values not in VALUES:
        raise EngineError(f"values must be one of {VALUES}, got {values!r}")
    rng = random.Random(f"probe:{seed}")
    text = "\n".join(d.text for d in corpus.documents).lower()
    keys, vals, specs = set(), set(), []
    for i in doc_indices:
        for depth in depths:
            for _ in range(2000):
                attr, ent = rng.choice(T.ATTRIBUTES), T.entity(rng, "eval")
                if (attr, ent) not in keys and ent not in text:
                    break
            else:
                raise EngineError(f"ran out of needle keys that do not occur in the corpus after {len(specs)} "
                                  "needles; plant fewer (fewer documents or depths)")
            for _ in range(2000):
                v = T.make_value(rng, "eval", None if values == "mixed" else values)
                if v not in vals and v.lower() not in text:
                    break
            else:
                raise EngineError("ran out of needle values that do not occur in the corpus; plant fewer")
            keys.add((attr, ent))
            vals.add(v)
            specs.append(_Spec(i, depth, attr, ent, v))
    return specs


def _plant(corpus: Corpus, specs: Sequence[_Spec]) -> tuple[Corpus, list[Needle]]:
    """A copy of `corpus` with each spec's needle line planted (T.plant) in its document; the Needles in
    spec order."""
    docs = list(corpus.documents)
    needles: list[Needle | None] = [None] * len(specs)
    by_doc: dict[int, list[int]] = {}
    for k, s in enumerate(specs):
        by_doc.setdefault(s.doc_index, []).append(k)
    for i, ks in by_doc.items():
        doc = corpus.documents[i]
        sents = [T.niah_sentence(specs[k].attribute, specs[k].entity, specs[k].value) for k in ks]
        text, spans = T.plant(doc.text, [(specs[k].depth, s) for k, (s, _) in zip(ks, sents)])
        docs[i] = replace(doc, text=text)
        for k, (sentence, voff), (start, _) in zip(ks, sents, spans):
            s = specs[k]
            needles[k] = Needle(doc.name, i, s.depth, text.count("\n", 0, start) + 1, s.attribute, s.entity, s.value,
                                sentence, T.niah_question(s.attribute, s.entity),
                                (start + voff, start + voff + len(s.value)))
    return Corpus(docs, list(corpus.skipped)), needles


def plant_needles(corpus: Corpus, depths: int | Sequence[float] = DEFAULT_DEPTHS,
                  documents: int | Sequence[str] | None = None, seed: int = 0,
                  values: str = "number") -> tuple[Corpus, list[Needle]]:
    """Plant one needle per (document, depth) into copies of the documents (module docstring): the planted
    Corpus (the input is not changed) and the Needles, document-major (corpus order), depth-minor.
    `documents`: None (all), N (spread evenly) or names (select_documents); `values`: number (3-8 digits,
    the shipped model's trained case), code, words or mixed (runtime/tasks.py make_value)."""
    depths = resolve_depths(depths)
    specs = _draw(corpus, select_documents(corpus, documents), depths, seed, values)
    return _plant(corpus, specs)


# --------------------------------------------------------------------------------------------- asking
def _value_tokens(session, needles: Sequence[Needle]) -> list[tuple[int, int]]:
    """Context positions [a, b) of each needle's value, from the session's layout of the planted corpus."""
    tok, layout = session.engine.tokenizer, session.layout
    offsets: dict[int, list] = {}
    out = []
    for n in needles:
        d = layout.documents[n.doc_index]
        if n.doc_index not in offsets:
            ids, offs = tok.encode_with_offsets(layout.texts[n.doc_index])  # as Layout.build encoded it
            if len(ids) != d.text_end - d.text_start:
                raise RuntimeError(f"{d.name}: {len(ids)} tokens re-encoded, {d.text_end - d.text_start} laid out")
            offsets[n.doc_index] = offs
        out.append(T.char_span_to_tokens(offsets[n.doc_index], n.char_span, session.offset + d.text_start))
    return out


def _ask(session, question: str, max_new_tokens: int, capture: Capture) -> tuple[list[int], str, int]:
    """Answer ids, stop reason and the first answer query's position for `question` asked as the session's
    first question (the ids, stop ids, context limit and lock of Session.ask); the cache is rewound to the
    corpus mark afterwards, so the next question sees the corpus alone again."""
    eng = session.engine
    tok = eng.tokenizer
    turn = session.chat.turn_ids(tok.encode(question), session.cache.length)
    try:
        logits = prefill(eng.model, turn, session.cache, chunk_size=eng.chunk_size, capture=capture,
                         lock=eng.guard(), trim=False)
        query = session.cache.length - 1
        gen = Generation(eng.model, session.cache, logits, GenerationParams(max_new_tokens=max_new_tokens),
                         stop_ids={tok.eos_id, tok.user_id}, capture=capture, max_context=eng.context_limit()[0],
                         lock=eng.guard())
        ids = list(gen)
    finally:
        session.cache.rewind(session.corpus.mark)
    return ids, gen.stop_reason, query


def _edits(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _near(out: str, value: str) -> bool:
    """`out` looks like a copy of `value` gone wrong: it starts like it or is an edit or two away."""
    return bool(out) and (_prefix(out, value) >= min(3, len(value) - 1)
                          or _edits(out[:len(value) + 4], value) <= max(1, len(value) // 4))


class _CorpusText:
    """Where an answer occurs in the documents as they were before planting: the text itself, or a number
    it looks like a copy of (built on the first miss that needs it)."""

    def __init__(self, corpus: Corpus):
        self.docs = corpus.documents
        self._numbers: list[tuple[str, int, int]] | None = None  # (digits, document index, char offset)

    def _at(self, i: int, pos: int, text: str) -> tuple[str, int, str]:
        return self.docs[i].name, self.docs[i].text.count("\n", 0, pos) + 1, text

    def find(self, out: str) -> tuple[str, int, str] | None:
        if len(out) < 3:
            return None
        for i, d in enumerate(self.docs):
            pos = d.text.find(out)
            if pos >= 0:
                return self._at(i, pos, out)
        if not out.isdigit():
            return None
        if self._numbers is None:
            self._numbers = [(m.group(), i, m.start()) for i, d in enumerate(self.docs)
                             for m in re.finditer(r"\d{3,}", d.text)]
        near = [n for n in self._numbers if n[0][:2] == out[:2] and _near(out, n[0])]
        if not near:
            return None
        digits, i, pos = max(near, key=lambda n: _prefix(out, n[0]))
        return self._at(i, pos, digits)


def _classify(cell: NeedleCell, values: dict[int, str], me: int, corpus: _CorpusText) -> None:
    """Set `miss` (MISS_KINDS, tried in order), `confused_with` and `corpus_match`; `values`: cell index ->
    value of the needles in its context."""
    if cell.ok:
        return
    out, value = cell.output.strip(), cell.needle.value
    others = [j for j, v in values.items() if j != me and (out == v or _near(out, v))]
    exact = [j for j in others if values[j] == out]
    if exact or (others and not _near(out, value)):
        cell.miss = "another_fact"
        cell.confused_with = exact[0] if exact else max(others, key=lambda j: _prefix(out, values[j]))
    elif _near(out, value):
        cell.miss = "copy_slip"
    elif (found := corpus.find(out)) is not None:
        cell.miss, cell.corpus_match = "corpus_value", found
    elif not cell.selected and not cell.in_window:
        cell.miss = "not_selected"
    else:
        cell.miss = "wrong"


def needle_grid(engine, corpus: Corpus | Sequence[str | os.PathLike], depths: int | Sequence[float] = DEFAULT_DEPTHS,
                documents: int | Sequence[str] | None = None, seed: int = 0, *, tokenizer=None,
                values: str = "number", per_context: str = "all", max_new_tokens: int | None = None,
                progress: Callable[[ProbeProgress], None] | None = None,
                stop: threading.Event | None = None) -> NeedleGrid:
    """Plant needles in `corpus` (a Corpus, or paths to ingest), ask for each through the app's path and
    return the NeedleGrid (module docstring). `engine`: a runtime.Engine (or a model, with `tokenizer`).
    Uses a session of its own (a second cache next to any the caller holds), dropped when it returns.
    Raises ContextTooLarge when the planted corpus does not fit the engine's limits, Cancelled when `stop`
    is set (checked per prefill chunk and per question), EngineError on bad arguments."""
    if tokenizer is not None:
        engine = Engine(engine, tokenizer)
    if per_context not in MODES:
        raise EngineError(f"per_context must be one of {MODES}, got {per_context!r}")
    if not isinstance(corpus, Corpus):
        corpus = ingest(list(corpus))
    depths = resolve_depths(depths)
    doc_indices = select_documents(corpus, documents)
    specs = _draw(corpus, doc_indices, depths, seed, values)
    groups = [specs] if per_context == "all" else [[s] for s in specs]
    cfg, tok = engine.config, engine.tokenizer
    session = engine.new_session()
    original = _CorpusText(corpus)
    cells: list[NeedleCell] = []
    timings = {"prefill_s": 0.0, "ask_s": 0.0, "prefill_tokens": 0}
    for c, group in enumerate(groups, 1):
        planted, needles = _plant(corpus, group)
        on_prefill = None if progress is None else \
            (lambda p, c=c: progress(ProbeProgress("prefill", p.done, p.total, c, len(groups))))
        t0 = time.perf_counter()
        report = session.load_corpus(planted, progress=on_prefill, stop=stop)
        t1 = time.perf_counter()
        timings["prefill_s"] += t1 - t0
        timings["prefill_tokens"] += report.tokens
        spans = _value_tokens(session, needles)
        base = len(cells)  # this context's first cell
        for k, (needle, span) in enumerate(zip(needles, spans)):
            if stop is not None and stop.is_set():
                raise Cancelled(f"the needle test was stopped after {len(cells)} of {len(specs)} questions")
            cap = Capture()
            cap_tokens = max_new_tokens or len(tok.encode(needle.value)) + 8
            ids, reason, query = _ask(session, needle.question, cap_tokens, cap)
            ranks = span_ranks(cap, cfg, query, spans)  # every needle of the context, to compare with the asked one
            mine = ranks[k]
            best = [r for r in mine if r is not None]
            other_best = [r for j, rs in enumerate(ranks) if j != k for r in rs if r is not None]
            first = None if len(ranks) == 1 else bool(best) and (not other_best or min(best) < min(other_best))
            recall = sum(r is not None for r in mine) / len(mine) if mine else None
            output = tok.decode(ids, skip_special_tokens=True)
            cells.append(NeedleCell(needle, output, ids, reason, output.strip() == needle.value, span, report.tokens,
                                    recall, mine, span[0] > query - cfg.sliding_window, first))
            if progress is not None:
                progress(ProbeProgress("ask", len(cells), len(specs), c, len(groups)))
        in_context = {base + j: n.value for j, n in enumerate(needles)}  # only these can be confused
        for j in in_context:
            _classify(cells[j], in_context, j, original)
        timings["ask_s"] += time.perf_counter() - t1
    timings["questions"] = len(cells)
    return NeedleGrid(depths, [corpus.documents[i].name for i in doc_indices], cells, per_context, seed, values,
                      len(corpus.documents), cfg.index_topk, timings)


# --------------------------------------------------------------------------------------------- CLI
def parse_documents(text: str | None) -> int | list[str] | None:
    """--documents: a count ('4') or comma-separated names ('a.md,notes/b.txt')."""
    if text is None or not text.strip():
        return None
    t = text.strip()
    if t.isdigit():
        return int(t)
    return [p.strip() for p in t.split(",") if p.strip()]


def main_probe(args) -> int:
    """`python -m runtime eval niah --haystack-dir DIR ...` (arguments: runtime/evaluate.py)."""
    if args.kind != "niah":
        raise EngineError(f"--haystack-dir plants needle facts: use it with `eval niah`, not `eval {args.kind}`")
    if args.haystack:
        raise EngineError("--haystack cuts random haystacks from files and --haystack-dir plants needles in a "
                          "folder's own documents: give one of them")
    if args.plot or args.include or args.render_only:
        raise EngineError("--plot, --include and --render-only draw the length x depth evaluation; with "
                          "--haystack-dir the grid is printed (all of it with --json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    corpus = ingest([args.haystack_dir])
    for s in corpus.skipped:
        print(f"skipped {s.name}: {s.reason}", file=sys.stderr)
    engine = Engine.from_dir(args.model, chunk_size=args.chunk, index_dtype=getattr(args, "index_dtype", "auto"))
    load_s = time.perf_counter() - t0

    def progress(p: ProbeProgress) -> None:
        if p.stage == "prefill" and p.done == p.total:
            print(f"context {p.context}/{p.contexts}: prefilled {p.total:,} tokens", file=sys.stderr, flush=True)

    grid = needle_grid(engine, corpus, args.depths, parse_documents(args.documents), args.seed, values=args.values,
                       per_context=args.per_haystack or "all", progress=progress)
    grid.timings["load_s"] = load_s
    if args.json:
        print(json.dumps(grid.to_dict(), ensure_ascii=False), flush=True)
    else:
        print(grid.format_table())
    return 0


__all__ = ["DEFAULT_DEPTHS", "MISS_KINDS", "MODES", "Needle", "NeedleCell", "NeedleGrid", "ProbeProgress",
           "main_probe", "needle_grid", "parse_documents", "plant_needles", "resolve_depths", "select_documents"]
