"""Counterfactual selection: force chosen spans out of (or into) every CSA layer's top-k, or change its width.

A `Steering` says what to force, in context positions (the tokens of a session's cache):

    Steering(exclude=[(start, end), ...], include=[(start, end), ...], index_topk=None)

and goes to the model the way a `Capture` does, as an argument of one forward:
`model(ids, cache, steering=s)` (or `Steered(model, s)`, the callable runtime/generate.py drives).
Nothing is global; `steering=None` is the default path, unchanged and at the same cost.

What it does, in every CSA layer and for every query of that forward (runtime/attention.py,
`select_topk`); the sliding window and the HCA entries are left as they are:
- exclude: entry w of a layer with rate m covers tokens [w*m, (w+1)*m) (the convention of
  runtime/introspect.py and runtime/provenance.py); an entry touching an excluded token is excluded.
  Its index score is -inf before the top-k, so it is never selected and gets exactly zero attention
  weight; a pick that only an excluded (or future) entry could fill is left empty (-1). The window
  still reads the excluded tokens when they are among the last sliding_window, HCA still reads them
  pooled 128:1, and CSA entry w+1 pools the first half of window w's features (the overlap), so an
  excluded span's text is kept out of the CSA selection, not out of the model.
- include: every included entry that exists and is visible to the query is selected (its score is +inf
  before the top-k), and the rest of the index_topk picks go by score as usual: the selection keeps its
  width. Exclusion wins where both name an entry. The scores a selection reports are the indexer's own.
- index_topk: the top-k width for this forward instead of the config's.

Spans come from the inspector as token ranges (a cell is entry w: `entry_tokens(w, rate)`; a source
chip has token_start/token_end) or from the command line as `FILE[:START-END]` line specs
(`Steering.from_specs`, `span_tokens`: lines 1-based and inclusive, FILE alone = the whole document,
FILE the name a document has in the corpus: the path as given to `--corpus`).

`compare(old, new, steering, ...)` (pure: provenances in, numpy out) is the difference two answers' sparse
attention made: per CSA layer the entries selected before and not after and vice versa, the mass split
per layer, and the weight on each steered span before and after. runtime/session.py's
`Session.counterfactual` runs both answers from a turn's cache mark and returns it. `SCOPE_NOTE` is the
sentence a page or terminal showing a counterfactual should show with it.
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .errors import EngineError

Range = tuple[int, int]  # context positions [start, end)
# what a page or a terminal showing a counterfactual should say about its scope
SCOPE_NOTE = ("Only the CSA top-k selection is steered: the sliding window and the HCA entries still read every "
              "token, excluded ones included.")
_SPEC = re.compile(r"^(?P<file>.+?):(?P<first>\d+)(?:-(?P<last>\d+))?$")


# ------------------------------------------------------------------------------------ entries and tokens
def entry_range(start: int, end: int, rate: int) -> tuple[int, int]:
    """Entry ids [a, b) of a layer with compression `rate` whose tokens [w*rate, (w+1)*rate) touch [start, end)."""
    return (start // rate, -(-end // rate)) if end > start else (0, 0)


def entry_tokens(entry: int, rate: int) -> Range:
    """Context tokens [w*rate, (w+1)*rate) of entry w (what a heatmap cell stands for)."""
    return entry * rate, (entry + 1) * rate


def runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ids as runs [a, b) of consecutive ids."""
    out: list[list[int]] = []
    for i in sorted(set(int(x) for x in ids)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]


def _ranges(value, what: str) -> tuple[Range, ...]:
    out = []
    for r in value or ():
        try:
            a, b = (int(x) for x in r)
        except (TypeError, ValueError):
            raise EngineError(f"{what}: expected (start, end) token ranges, got {r!r}") from None
        if a < 0 or b <= a:
            raise EngineError(f"{what}: the token range [{a}, {b}) is empty or negative")
        out.append((a, b))
    return tuple(out)


@dataclass(frozen=True)
class Steering:
    """What to force on the CSA selection of a forward (see the module docstring)."""
    exclude: tuple[Range, ...] = ()  # context token ranges [start, end) whose entries are never selected
    include: tuple[Range, ...] = ()  # context token ranges whose visible entries are always selected
    index_topk: int | None = None  # top-k width instead of the config's index_topk

    def __post_init__(self):
        object.__setattr__(self, "exclude", _ranges(self.exclude, "exclude"))
        object.__setattr__(self, "include", _ranges(self.include, "include"))
        k = self.index_topk
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise EngineError(f"index_topk must be a positive whole number, got {k!r}")

    @property
    def empty(self) -> bool:
        """Nothing forced: the model runs its default path."""
        return not self.exclude and not self.include and self.index_topk is None

    @classmethod
    def from_specs(cls, layout, offset: int, exclude: Sequence[str | Range] = (), include: Sequence[str | Range] = (),
                   index_topk: int | None = None) -> "Steering":
        """A Steering from `FILE[:START-END]` line specs (see `span_tokens`) and/or (start, end) token ranges."""
        def resolve(items):
            out = []
            for it in items:
                out += span_tokens(it, layout, offset) if isinstance(it, str) else [tuple(it)]
            return out
        return cls(tuple(resolve(exclude)), tuple(resolve(include)), index_topk)

    def entry_ids(self, which: str, rate: int, n: int) -> np.ndarray:
        """Sorted ids < n of the entries (rate `rate`) that the `which` ("exclude" / "include") ranges touch."""
        mask = np.zeros(n, dtype=bool)
        for s, e in getattr(self, which):
            a, b = entry_range(s, e, rate)
            mask[a:b] = True
        return np.flatnonzero(mask)

    def entry_masks(self, n: int, rate: int, device=None):
        """(excluded, included) bool tensors [n] over a CSA layer's n entries, each None when it names none
        of them (what runtime/attention.py's select_topk takes)."""
        import torch

        out = []
        for ranges in (self.exclude, self.include):
            mask = None
            for s, e in ranges:
                a, b = entry_range(s, e, rate)
                if a < n:
                    if mask is None:
                        mask = torch.zeros(n, dtype=torch.bool, device=device)
                    mask[a:min(b, n)] = True
            out.append(mask)
        return out[0], out[1]

    def to_dict(self) -> dict:
        return {"exclude": [list(r) for r in self.exclude], "include": [list(r) for r in self.include],
                "index_topk": self.index_topk}


class Steered:
    """`model` with `steering` bound to every forward: the callable runtime/generate.py drives
    (`m(input_ids, cache, capture=..., logits_to_keep=...)`, `.device`)."""

    def __init__(self, model, steering: Steering | None):
        self.model, self.steering = model, steering

    @property
    def device(self):
        return self.model.device

    def __call__(self, input_ids, cache=None, capture=None, logits_to_keep: int = 0):
        return self.model(input_ids, cache, capture=capture, logits_to_keep=logits_to_keep, steering=self.steering)

    def decode(self, input_ids, cache, capture=None):
        """One-token steps through the model's own (its compiled step, steered: runtime/compiled.py)."""
        return self.model.decode(input_ids, cache, capture, steering=self.steering)


# ------------------------------------------------------------------------------------ FILE[:START-END]
def parse_span(spec: str) -> tuple[str, int | None, int | None]:
    """`FILE`, `FILE:N` or `FILE:START-END` -> (file, first line, last line); lines None for the whole file.
    (A file whose own name ends in `:N` is matched whole first: `span_tokens` tries the spec as a name.)"""
    if not isinstance(spec, str) or not spec.strip():
        raise EngineError(f"an empty span: expected FILE or FILE:START-END, got {spec!r}")
    m = _SPEC.match(spec)
    if m is None:
        if re.search(r":[\d\s-]*-[\d\s-]*$", spec):  # a line range gone wrong ("a.txt:5-", "a.txt:-3")
            raise EngineError(f"{spec}: expected FILE:START-END with line numbers, e.g. notes.txt:3-9")
        return spec, None, None
    first = int(m["first"])
    last = int(m["last"]) if m["last"] is not None else first
    if first < 1 or last < first:
        raise EngineError(f"{spec}: lines are numbered from 1 and START must not be after END")
    return m["file"], first, last


def _norm(name: str) -> str:
    return os.path.normpath(name.replace("\\", "/")).replace("\\", "/")


def match_documents(name: str, names: Sequence[str]) -> tuple[list[int], bool]:
    """(indices of the documents `name` means, whether it names a folder): the one of that name (also
    after normalising `./`, `//`, a trailing `/`), else every document under the folder `name`."""
    if name in names:
        return [names.index(name)], False
    want = _norm(name)
    same = [i for i, n in enumerate(names) if _norm(n) == want]
    if same:
        return same[:1], False
    prefix = "" if want == "." else want.rstrip("/") + "/"
    return [i for i, n in enumerate(names) if _norm(n).startswith(prefix)], True


def _unknown(name: str, names: Sequence[str]) -> EngineError:
    shown = ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")
    return EngineError(f"no document named {name!r} in the corpus (documents: {shown or 'none'})")


def check_specs(specs: Sequence[str], documents: Sequence[tuple[str, int]]) -> None:
    """Check `FILE[:START-END]` specs against (name, number of lines) of each document, before any prefill."""
    names = [n for n, _ in documents]
    for spec in specs:
        file, first, last = (spec, None, None) if spec in names else parse_span(spec)
        docs, folder = match_documents(file, names)
        if not docs:
            raise _unknown(file, names)
        if first is not None:
            if folder:
                raise EngineError(f"{spec}: {file} is a folder; line ranges need one file")
            n_lines = documents[docs[0]][1]
            if last > n_lines:
                raise EngineError(f"{spec}: that file has {n_lines} lines")


def count_lines(text: str) -> int:
    """Lines of a document's text as runtime/corpus.py's Layout numbers them (a final newline ends the last)."""
    return text.count("\n") + 1 - (len(text) > 0 and text.endswith("\n"))


def span_tokens(spec: str, layout, offset: int) -> list[Range]:
    """Context token ranges of a `FILE[:START-END]` spec in a corpus `layout` whose token 0 sits at context
    position `offset`: a whole document is its tokens with the `### File:` header, a line range the text
    tokens of those lines (a token belongs to the line it starts on). EngineError (bad_request) for an
    unknown file, a line range outside the file or one holding no tokens."""
    if layout is None:
        raise EngineError("no corpus is loaded: there is nothing to steer")
    docs = layout.documents
    names = [d.name for d in docs]
    file, first, last = (spec, None, None) if spec in names else parse_span(spec)
    found, _ = match_documents(file, names)
    if not found:
        raise _unknown(file, names)
    check_specs([spec], [(d.name, d.n_lines) for d in docs])
    if first is None:
        out: list[list[int]] = []
        for i in found:
            d = docs[i]
            if out and out[-1][1] == d.token_start + offset:
                out[-1][1] = d.token_end + offset
            else:
                out.append([d.token_start + offset, d.token_end + offset])
        return [(a, b) for a, b in out]
    d = docs[found[0]]
    lines = layout.lines[d.text_start:d.text_end]  # non-decreasing within a document's text
    a = d.text_start + bisect.bisect_left(lines, first)
    b = d.text_start + bisect.bisect_right(lines, last)
    if a >= b:
        raise EngineError(f"{spec}: no text tokens start on {'line' if first == last else 'lines'} "
                          f"{first}{'' if first == last else f'-{last}'} of {d.name} (blank?)")
    return [(a + offset, b + offset)]


# ------------------------------------------------------------------------------------ old vs new
@dataclass(frozen=True)
class SelectionDiff:
    """One CSA layer's selection over a whole answer, before (old) and after (new). Weights are the
    head-averaged attention a query gave those entries, averaged over the answer's tokens."""
    layer: int
    rate: int
    dropped: np.ndarray  # entry ids picked for some old-answer token and for no new-answer token
    added: np.ndarray  # picked for some new-answer token and for no old-answer token
    kept: int  # how many entries both answers picked
    dropped_weights: np.ndarray  # the old answer's weight on each dropped entry: mass that had to go elsewhere
    added_weights: np.ndarray  # the new answer's weight on each added entry

    @property
    def dropped_weight(self) -> float:
        return float(self.dropped_weights.sum())

    @property
    def added_weight(self) -> float:
        return float(self.added_weights.sum())

    def where(self, which: str, describe, top: int = 10) -> list[tuple[str, float]]:
        """The heaviest `top` places ("dropped" / "added") as (describe(tokens), weight), runs of entries
        that describe alike summed."""
        ids, w = (self.dropped, self.dropped_weights) if which == "dropped" else (self.added, self.added_weights)
        places: dict[str, float] = {}
        for a, b in runs(ids):
            name = describe(a * self.rate, b * self.rate) or f"tokens {a * self.rate}-{b * self.rate}"
            places[name] = places.get(name, 0.0) + float(w[(ids >= a) & (ids < b)].sum())
        return sorted(places.items(), key=lambda kv: -kv[1])[:top]

    def to_dict(self, describe=None, top: int = 10) -> dict:
        out = {"rate": self.rate, "dropped": int(len(self.dropped)), "added": int(len(self.added)),
               "kept": self.kept, "dropped_weight": round(self.dropped_weight, 6),
               "added_weight": round(self.added_weight, 6)}
        if describe is not None:
            for which in ("dropped", "added"):
                out[f"{which}_where"] = [{"where": k, "weight": round(v, 6)}
                                         for k, v in self.where(which, describe, top)]
        return out


@dataclass(frozen=True)
class LayerMass:
    """One layer's mean attention split (window, compressed, sink) over the old and the new answer."""
    layer: int
    before: tuple[float, float, float]
    after: tuple[float, float, float]

    @property
    def moved(self) -> tuple[float, float, float]:
        return tuple(b - a for a, b in zip(self.before, self.after))


@dataclass(frozen=True)
class SpanWeight:
    """Attention weight on one steered span's entries, per layer, mean per answer token, before and after."""
    kind: str  # "exclude" or "include"
    token_start: int
    token_end: int
    where: str  # "file:first-last; ..." ('' outside the corpus)
    csa_before: dict[int, float] = field(default_factory=dict)
    csa_after: dict[int, float] = field(default_factory=dict)
    hca_before: dict[int, float] = field(default_factory=dict)  # HCA is never steered: context only
    hca_after: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        r = lambda d: {str(k): round(v, 6) for k, v in d.items()}  # noqa: E731
        return {"kind": self.kind, "token_start": self.token_start, "token_end": self.token_end, "where": self.where,
                "csa_before": r(self.csa_before), "csa_after": r(self.csa_after),
                "hca_before": r(self.hca_before), "hca_after": r(self.hca_after)}


def _per_token(prov, table: str, layer: int, n: int) -> np.ndarray:
    """A provenance's per-entry array of `layer` (csa / csa_counts / hca), padded to n; weights are
    averaged over the answer tokens (counts are left as counts)."""
    out = np.zeros(n)
    if prov is None or layer not in getattr(prov, table):
        return out
    arr = np.asarray(getattr(prov, table)[layer], dtype=np.float64)[:n]
    out[:len(arr)] = arr
    return out if table == "csa_counts" else out / max(len(prov.tokens), 1)


def compare(old, new, steering: Steering, csa_rates: dict[int, int], hca_rates: dict[int, int] | None = None,
            describe=None) -> tuple[dict[int, SelectionDiff], dict[int, LayerMass], list[SpanWeight]]:
    """(selection difference per CSA layer, mass split per layer, weight on each steered span) between two
    answers' provenances (runtime/provenance.py; None for an answer with no tokens). `describe(start, end)`
    names context tokens (Provenance.describe)."""
    hca_rates = hca_rates or {}
    size = lambda m: max((p.n_context for p in (old, new) if p is not None), default=0) // m  # noqa: E731
    selection = {}
    for layer, m in sorted(csa_rates.items()):
        n = size(m)
        oc, nc = _per_token(old, "csa_counts", layer, n) > 0, _per_token(new, "csa_counts", layer, n) > 0
        ow, nw = _per_token(old, "csa", layer, n), _per_token(new, "csa", layer, n)
        dropped, added = np.flatnonzero(oc & ~nc), np.flatnonzero(nc & ~oc)
        selection[layer] = SelectionDiff(layer, m, dropped, added, int((oc & nc).sum()), ow[dropped], nw[added])
    mass = {}
    layers = sorted(set(old.mass if old else ()) | set(new.mass if new else ()))
    for layer in layers:
        zero = (0.0, 0.0, 0.0)
        mass[layer] = LayerMass(layer, tuple(old.mass.get(layer, zero)) if old else zero,
                                tuple(new.mass.get(layer, zero)) if new else zero)
    spans = []
    for kind in ("exclude", "include"):
        for s, e in getattr(steering, kind):
            sw = SpanWeight(kind, s, e, describe(s, e) if describe is not None else "")
            for rates, before, after, table in ((csa_rates, sw.csa_before, sw.csa_after, "csa"),
                                                (hca_rates, sw.hca_before, sw.hca_after, "hca")):
                for layer, m in sorted(rates.items()):
                    n = size(m)
                    a, b = entry_range(s, e, m)
                    before[layer] = float(_per_token(old, table, layer, n)[a:b].sum())
                    after[layer] = float(_per_token(new, table, layer, n)[a:b].sum())
            spans.append(sw)
    return selection, mass, spans


__all__ = ["LayerMass", "Range", "SCOPE_NOTE", "SelectionDiff", "SpanWeight", "Steered", "Steering", "check_specs",
           "compare", "count_lines", "entry_range", "entry_tokens", "match_documents", "parse_span", "runs",
           "span_tokens"]
