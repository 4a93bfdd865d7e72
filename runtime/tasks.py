"""Seeded generators of retrieval items on natural-text haystacks, shared by evaluation (runtime/evaluate.py)
and training (train/tasks.py builds its training examples from these): the planted formats, the questions,
the values, and the haystack token pool. No torch here.

Three skills, all in the chat layout of ``runtime/tokenizer.py`` (``render_chat``): the haystack (with
whatever was planted in it) and the question form the user turn, separated by a blank line; the assistant
answers with the value only, closed by EOS.

Question formats (``{...}`` are the generated parts):

niah (needle facts)
    planted line:  ``The {attribute} for the {entity} is {value}.`` (non-numeric values in double quotes)
    question:      ``What is the {attribute} for the {entity}?``
    ``attribute`` is e.g. "access code", ``entity`` an adjective + place ("north gate").
kv (key-value lookup in structured text) -- a block of pairs in one of four formats (``kv_block``):
    json    ``{ "ember_port": "QX-4471", "cobalt_mode": 4471930, ... }`` (pretty-printed, one pair a line)
            question ``What is the value of "{key}" in the JSON data above?``
    csv     header ``key,value`` then ``{key},{value}`` rows
            question ``What is the value for {key} in the CSV table above?``
    config  ``[section]`` then ``{key}={value}`` lines
            question ``What is {key} set to in the config above?``
    code    Python constants ``{KEY} = {value}`` (strings quoted, numbers bare)
            question ``What is the value of the constant {KEY} in the code above?``
continue (quote continuation) -- no planting: a snippet of 24-56 characters that occurs exactly once in the
    haystack, ending at a word boundary, is quoted back and the answer is what follows it on the same line
    (the next 1-5 words, at most 40 characters, leading space included; ``find_snippet``).
    question:      ``Continue this quote from the text above: "{snippet}"``
    Exact match is judged on the stripped strings.

Values are multi-token: ``number`` (3-8 digits, e.g. 7364019 -> 7|36|4|01|9), ``code`` (2-3 capitals, dash,
3-4 digits, optional dash and capital: "QX-4471-B") and ``words`` (word-NN: "falcon-12"), drawn 60/25/15%.
String values are quoted in the haystack where the format allows it (json, code), so that the answer's
tokens equal the tokens of the value in the context. Positions are arbitrary, so values straddle the
4-token CSA compression windows freely.

Train / eval disjointness ("variant"): entity adjectives and nouns, kv key words and the word lists of
``words`` values are split into disjoint train and eval lists; ``numbers`` and ``codes`` are random strings
of the same shape in both (a disjoint *format* would test a different skill). Training haystacks come from
the ``train`` split of runtime/haystacks.py, evaluation haystacks from the pinned ``heldout`` split
(``TokenPool.corpus``) or from files the user names. Attributes and question templates are shared (they are
the instruction, not the key).

Every generator takes a ``random.Random`` and is deterministic given its state.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import haystacks

KINDS = ("niah", "kv", "continue")
VARIANTS = ("train", "eval")

# --------------------------------------------------------------------------------------------- vocabularies
ATTRIBUTES = ["access code", "pass key", "serial number", "locker combination", "PIN", "confirmation number",
              "tracking number", "password", "account number", "badge number", "license key", "order number",
              "ticket number", "reference code", "secret word", "unlock code"]

_WORDS = {
    "train": {
        "adj": ["north", "south", "east", "west", "blue", "red", "green", "old", "new", "upper", "lower", "main",
                "small", "great", "inner", "outer", "silver", "golden", "quiet", "central", "hidden", "rear",
                "front", "second", "third", "eastern", "western", "stone", "iron", "wooden"],
        "noun": ["gate", "warehouse", "library", "tower", "bridge", "garage", "cellar", "station", "harbor",
                 "museum", "office", "kitchen", "archive", "workshop", "laboratory", "garden", "stable", "hall",
                 "vault", "depot", "school", "market", "clinic", "factory", "studio", "barn", "cabin", "dock",
                 "pavilion", "terminal"],
        "key": ["ember", "cobalt", "timeout", "retry", "cache", "buffer", "socket", "thread", "queue", "index",
                "render", "shadow", "signal", "vector", "matrix", "cursor", "packet", "stream", "token", "filter",
                "window", "channel", "session", "worker", "batch", "limit", "offset", "prefix", "handle", "route",
                "mirror", "pixel", "anchor", "ledger", "sample", "cluster", "margin", "weight", "scale", "depth"],
        "key2": ["port", "mode", "size", "count", "level", "path", "name", "rate", "delay", "ratio", "seed",
                 "host", "user", "slot", "code", "mask", "flag", "step", "width", "height"],
        "value": ["amber", "falcon", "river", "maple", "copper", "lantern", "meadow", "harvest", "thunder",
                  "willow", "canyon", "pepper", "marble", "velvet", "cricket", "glacier", "saddle", "orchid",
                  "pebble", "rocket", "walnut", "badger", "cobble", "tundra", "violet", "bramble", "quartz",
                  "sparrow", "juniper", "mustard"],
    },
    "eval": {
        "adj": ["crimson", "misty", "sunny", "frozen", "ancient", "narrow", "twisted", "sleepy", "distant",
                "forgotten", "copper", "velvet", "marble", "dusty", "windy"],
        "noun": ["lighthouse", "observatory", "greenhouse", "chapel", "armory", "bakery", "quarry", "fortress",
                 "monastery", "mill", "pier", "theater", "gallery", "embassy", "orchard"],
        "key": ["falcon", "harbor", "lantern", "prism", "glacier", "nimbus", "quill", "saffron", "tundra",
                "zephyr", "beacon", "cinder", "drift", "fable", "garnet"],
        "key2": ["volume", "tier", "zone", "grade", "quota", "phase", "ttl", "epoch", "bias", "span"],
        "value": ["opal", "heron", "basalt", "clover", "dune", "ember", "fjord", "gale", "hazel", "ivory",
                  "jasper", "kestrel", "lagoon", "mango", "nutmeg"],
    },
}
_CONFIG_SECTIONS = ["server", "client", "database", "network", "storage", "logging", "cache", "worker"]
_CSV_HEADERS = [("key", "value"), ("name", "setting"), ("field", "value"), ("id", "code")]


# --------------------------------------------------------------------------------------------- values
def make_value(rng: random.Random, variant: str, fmt: str | None = None, run_p: float = 0.0) -> str:
    """A planted value. ``run_p``: that share of numbers gets a run of 2-4 equal digits at a random place
    (the copy slips that survive training repeat or drop a digit of a run: 8444 -> 84444); 0 draws nothing."""
    if fmt is None:
        r = rng.random()
        fmt = "number" if r < 0.6 else "code" if r < 0.85 else "words"
    if fmt.startswith("number"):
        lo, hi = (3, 8) if fmt == "number" else map(int, fmt.split(":")[1].split("-"))
        n = rng.randint(lo, hi)
        digits = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(n - 1))
        if run_p and rng.random() < run_p:
            k = rng.randint(2, min(4, n))
            at = rng.randint(0, n - k)
            d = digits[at] if at == 0 else str(rng.randint(0, 9))  # a leading run keeps a non-zero digit
            digits = digits[:at] + d * k + digits[at + k:]
        return digits
    if fmt == "code":
        letters = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(rng.randint(2, 3)))
        digits = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 4)))
        tail = f"-{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}" if rng.random() < 0.3 else ""
        return f"{letters}-{digits}{tail}"
    if fmt == "words":
        return f"{rng.choice(_WORDS[variant]['value'])}-{rng.randint(10, 99)}"
    raise ValueError(f"unknown value format {fmt!r}")


def entity(rng: random.Random, variant: str) -> str:
    return f"{rng.choice(_WORDS[variant]['adj'])} {rng.choice(_WORDS[variant]['noun'])}"


def kv_key(rng: random.Random, variant: str) -> str:
    return f"{rng.choice(_WORDS[variant]['key'])}_{rng.choice(_WORDS[variant]['key2'])}"


# --------------------------------------------------------------------------------------------- haystack pool
class TokenPool:
    """One long token stream of haystack text; slices of it decoded back to text start at line starts."""

    def __init__(self, ids: np.ndarray, tokenizer, name: str = "pool"):
        self.ids = np.asarray(ids, dtype=np.int32)
        self.tok = tokenizer
        self.name = name
        nl = np.zeros(tokenizer.vocab_size, dtype=bool)
        for i in range(tokenizer.vocab_size):
            if i not in tokenizer.special_ids and b"\n" in tokenizer.token_bytes(i):
                nl[i] = True
        self.line_starts = np.flatnonzero(nl[self.ids]) + 1
        self.line_starts = self.line_starts[self.line_starts < len(self.ids)]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer, name: str = "pool", sep: str = "\n\n") -> "TokenPool":
        texts = [t for t in texts if t.strip()]
        encs = tokenizer.encode_batch([t.rstrip("\n") + sep for t in texts])
        ids = np.fromiter((i for e in encs for i in e), dtype=np.int32)
        return cls(ids, tokenizer, name)

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], tokenizer) -> "TokenPool":
        texts = []
        for p in paths:
            p = Path(p)
            files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
            for f in files:
                data = f.read_bytes()
                if b"\x00" in data[:8192]:
                    continue  # binary
                texts.append(data.decode("utf-8", errors="replace").replace("\r\n", "\n"))
        if not texts:
            raise ValueError(f"no readable text in {list(map(str, paths))}")
        return cls.from_texts(texts, tokenizer, name="files:" + ",".join(map(str, paths)))

    @classmethod
    def corpus(cls, split: str, max_bytes: int, tokenizer, cache_dir: str | os.PathLike | None = None,
               strict: bool | None = None, sources: Sequence[str] | None = None) -> "TokenPool":
        """The first ``max_bytes`` of a corpus split (runtime/haystacks.py), cached as .npy if asked. The
        ``heldout`` split is the manifest's pinned text (checked first; ``strict``: haystacks.pinned_texts).
        ``sources``: only these haystacks.SOURCES (one kind of text; default all, interleaved)."""
        path = None
        picked = tuple(sources or haystacks.SOURCES)
        tag = "" if picked == haystacks.SOURCES else "_" + "+".join(picked)
        if cache_dir is not None:
            h = hashlib.sha256(tokenizer._tok.to_str().encode()).hexdigest()[:10]
            path = Path(cache_dir) / f"pool_{split}_{max_bytes}{tag}_{h}.npy"
            if path.is_file():
                return cls(np.load(path), tokenizer, name=f"corpus:{split}{tag}")
        texts = haystacks.pinned_texts(max_bytes, strict, sources=picked) if split == "heldout" else \
            haystacks.iter_texts(split, max_bytes, sources=picked)
        pool = cls.from_texts(texts, tokenizer, name=f"corpus:{split}{tag}")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, pool.ids)
        return pool

    def slice_ids(self, n: int, rng: random.Random) -> np.ndarray:
        """About ``n`` tokens starting at a random line start (the stream is cycled if n exceeds it)."""
        start = int(self.line_starts[rng.randrange(len(self.line_starts))]) if len(self.line_starts) else 0
        if n <= len(self.ids) - start:
            return self.ids[start:start + n]
        reps = (start + n) // len(self.ids) + 1
        return np.tile(self.ids, reps)[start:start + n]

    def text(self, n: int, rng: random.Random) -> str:
        out = self.tok.decode(self.slice_ids(n, rng).tolist())
        return out.replace("\ufffd", "")


# --------------------------------------------------------------------------------------------- items
@dataclass
class QA:
    question: str
    answer: str
    value_chars: tuple[int, int] | None  # char span of the answer's source in the user content (first turn)
    depth: float = 0.0
    kind: str = ""
    value_tokens: tuple[int, int] | None = None  # token span in ids (filled by the caller: char_span_to_tokens)
    answer_tokens: tuple[int, int] | None = None  # ids[a:b] = answer tokens + EOS (training: train/tasks.py render)
    # multi-value / multi-query: the answer's other values' char spans, and the values one by one (scored as a set)
    more_chars: tuple[tuple[int, int], ...] = ()
    values: tuple[str, ...] = ()
    # planted items that are not the answer (same-template facts with other keys): the selection must rank
    # the asked one above them
    distractor_chars: tuple[tuple[int, int], ...] = ()
    more_tokens: tuple[tuple[int, int], ...] = ()  # token spans of the two above (filled by the caller)
    distractor_tokens: tuple[tuple[int, int], ...] = ()
    fmt: str = ""  # kv: the block's format


def _line_start_at(text: str, pos: int) -> int:
    """The nearest line start at or before pos (0 if none)."""
    if pos <= 0:
        return 0
    if pos >= len(text):
        return len(text)
    j = text.rfind("\n", 0, pos)
    return 0 if j < 0 else j + 1


def plant(text: str, items: list[tuple[float, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Insert item strings (each becomes its own line(s)) at line starts near their depth in [0, 1].

    Returns the new text and each item's char span (in input order)."""
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    cuts, spans = [], [None] * len(items)
    for i in order:
        cuts.append(_line_start_at(text, int(round(items[i][0] * len(text)))))
    prev = 0
    pieces = []
    for i, c in zip(order, cuts):
        c = max(c, prev)
        pieces.append(text[prev:c])
        s = items[i][1]
        lead = "\n" if c == len(text) and text and not text.endswith("\n") else ""  # the text ends mid-line
        block = lead + (s if s.endswith("\n") else s + "\n")
        start = sum(len(p) for p in pieces) + len(lead)  # the span starts at the item, not at that newline
        pieces.append(block)
        spans[i] = (start, start - len(lead) + len(block))
        prev = c
    pieces.append(text[prev:])
    return "".join(pieces), spans


def niah_sentence(attr: str, ent: str, value: str) -> tuple[str, int]:
    """The needle line and the char offset of the value in it."""
    head = f"The {attr} for the {ent} is "
    if not value.isdigit():  # quoted, so the value's first token is the answer's first token
        return f'{head}"{value}".', len(head) + 1
    return f"{head}{value}.", len(head)


def niah_question(attr: str, ent: str) -> str:
    return f"What is the {attr} for the {ent}?"


def mv_sentence(attr: str, ent: str, value: str) -> tuple[str, int]:
    """A multi-value needle (RULER's MV: one key, several values planted apart) and the value's char offset."""
    head = f"One of the {attr}s for the {ent} is "
    if not value.isdigit():
        return f'{head}"{value}".', len(head) + 1
    return f"{head}{value}.", len(head)


def mv_question(attr: str, ent: str) -> str:
    return f"What are all the {attr}s for the {ent}?"


def mq_question(attr: str, ents: Sequence[str]) -> str:
    """Several keys of one template asked at once (RULER's MQ): answered as their values in this order."""
    names = [f"the {e}" for e in ents]
    return f"What are the {attr}s for {', '.join(names[:-1])} and {names[-1]}?"


_VALUE_SPLIT = re.compile(r"(?:\s*,\s*|\s+and\s+|\s+)")


def found_values(text: str) -> list[str]:
    """The values an answer lists (comma, space or "and" separated; quotes and a final period dropped)."""
    parts = _VALUE_SPLIT.split(text.strip().rstrip("."))
    return [v.strip('"\'.') for v in parts if v.strip('"\'.') and v.lower() != "and"]


def values_match(text: str, values: Sequence[str]) -> bool:
    """Exact match for several values: the answer lists exactly these values, each once, in any order."""
    got = found_values(text)
    return sorted(got) == sorted(values)


def kv_block(rng: random.Random, variant: str, n_pairs: int, fmt: str | None = None):
    """(block text, fmt, [(key_as_written, value, value char offset in block)])."""
    fmt = fmt or rng.choice(("json", "csv", "config", "code"))
    keys: list[str] = []
    while len(keys) < n_pairs:
        k = kv_key(rng, variant)
        if k not in keys:
            keys.append(k)
    vals = [make_value(rng, variant) for _ in keys]
    lines, pairs, off = [], [], 0

    def add(line: str, key: str, val: str, vpos: int):
        nonlocal off
        pairs.append((key, val, off + vpos))
        lines.append(line)
        off += len(line) + 1

    def plain(line: str):
        nonlocal off
        lines.append(line)
        off += len(line) + 1

    if fmt == "json":
        plain("{")
        for i, (k, v) in enumerate(zip(keys, vals)):
            comma = "," if i < len(keys) - 1 else ""
            lit = v if v.isdigit() else f'"{v}"'
            head = f'  "{k}": '
            add(f"{head}{lit}{comma}", k, v, len(head) + (0 if v.isdigit() else 1))
        plain("}")
    elif fmt == "csv":
        h = rng.choice(_CSV_HEADERS)
        plain(f"{h[0]},{h[1]}")
        for k, v in zip(keys, vals):
            add(f"{k},{v}", k, v, len(k) + 1)
    elif fmt == "config":
        plain(f"[{rng.choice(_CONFIG_SECTIONS)}]")
        for k, v in zip(keys, vals):
            add(f"{k}={v}", k, v, len(k) + 1)
    elif fmt == "code":
        for k, v in zip(keys, vals):
            K = k.upper()
            lit = v if v.isdigit() else f'"{v}"'
            head = f"{K} = "
            add(f"{head}{lit}", K, v, len(head) + (0 if v.isdigit() else 1))
    else:
        raise ValueError(f"unknown kv format {fmt!r}")
    return "\n".join(lines), fmt, pairs


KV_QUESTIONS = {
    "json": 'What is the value of "{key}" in the JSON data above?',
    "csv": "What is the value for {key} in the CSV table above?",
    "config": "What is {key} set to in the config above?",
    "code": "What is the value of the constant {key} in the code above?",
}

CONTINUE_QUESTION = 'Continue this quote from the text above: "{snippet}"'
_WORD_END = re.compile(r"\S(?=\s)")


def find_snippet(text: str, rng: random.Random, depth: float, lo: int = 0, hi: int | None = None,
                 tries: int = 200) -> tuple[str, str, int] | None:
    """(snippet, continuation, char offset of the continuation) near ``depth`` in text[lo:hi], or None.

    The snippet (24-56 chars, no newline, ends at a word end) occurs exactly once in ``text``; the
    continuation is the rest of its line, cut to 1-5 words and 40 chars, leading space kept."""
    hi = len(text) if hi is None else hi
    span = hi - lo
    if span < 200:
        return None
    for t in range(tries):
        jitter = (rng.random() - 0.5) * 0.02 * (1 + t / 10)
        pos = lo + int(min(max(depth + jitter, 0.0), 1.0) * (span - 1))
        ls = text.rfind("\n", lo, pos) + 1 if text.rfind("\n", lo, pos) >= 0 else lo
        le = text.find("\n", pos)
        le = hi if le < 0 or le > hi else le
        line = text[ls:le]
        if len(line) < 40 or not line.isprintable():
            continue
        # candidate snippet ends: word ends followed by a space, with >= 1 word after
        ends = [m.start() + 1 for m in _WORD_END.finditer(line)]
        ends = [e for e in ends if e >= 24 and line[e:].strip()]
        if not ends:
            continue
        e = rng.choice(ends)
        L = rng.randint(24, 56)
        s = max(0, e - L)
        while s > 0 and not line[s - 1].isspace():  # start at a word start
            s += 1
            if s >= e:
                break
        snippet = line[s:e]
        if len(snippet) < 16 or snippet.strip() != snippet or '"' in snippet:
            continue
        rest = line[e:]
        words = re.findall(r"\s+\S+", rest)[: rng.randint(1, 5)]
        cont = ""
        for w in words:
            if len(cont) + len(w) > 40:
                break
            cont += w
        if not cont.strip() or '\ufffd' in cont:
            continue
        if text.count(snippet) != 1:
            continue
        return snippet, cont, ls + e
    return None


# --------------------------------------------------------------------------------------------- token spans
def char_span_to_tokens(offsets: Sequence[tuple[int, int]], span: tuple[int, int], base: int) -> tuple[int, int]:
    """Token index range [a, b) (plus ``base``) of the tokens overlapping char span [s, e)."""
    s, e = span
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    ends = np.fromiter((o[1] for o in offsets), dtype=np.int64, count=len(offsets))
    a = int(np.searchsorted(ends, s, side="right"))
    b = int(np.searchsorted(starts, e, side="left"))
    return base + a, base + max(b, a + 1)


__all__ = ["KINDS", "VARIANTS", "ATTRIBUTES", "KV_QUESTIONS", "CONTINUE_QUESTION", "TokenPool", "QA", "make_value",
           "entity", "kv_key", "kv_block", "niah_sentence", "niah_question", "plant", "find_snippet",
           "char_span_to_tokens"]
