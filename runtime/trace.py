"""Traces: one answer's sparse-attention selection as a file, in Longlens' own JSON or SGLang's layout.

A `Trace` holds what the inspector shows for one answer, as plain data: the model, tokenizer and
corpus fingerprints, the corpus documents and their context token ranges, the question, the answer
(text, token ids, pieces), the context position of each answer token's query, per answer token and
CSA layer the entry ids the lightning indexer selected with the attention weight each received
(-1 = padding), per answer token and HCA layer its heaviest 128-token entries, the HCA weights over
the whole answer, the mass split (window / compressed / sink) per layer and the ranked sources.

    trace = Trace.from_answer(answer, question, session)      # or Trace.from_provenance(prov, question, text)
    text = trace.to_json(); Trace.from_json(text) == trace     # format tag "longlens-trace/1"
    prov = trace.to_provenance(session.layout, session.offset) # a runtime Provenance: the inspector's input
    obj = to_sglang(trace); from_sglang(obj, config, documents=..., offset=...)

The Longlens format, one JSON object (ARRAY = {"dtype": "int32"|"float32"|"float64", "shape": [...],
"base64": little-endian C-order bytes}):

    {"format": "longlens-trace/1", "origin": "longlens" | "sglang",
     "model": {"name", "fingerprint", "index_topk"}, "tokenizer": {"fingerprint"},
     "corpus": {"fingerprint", "offset", "documents": [[name, start, end], ...]},   # context positions
     "question", "answer": {"text", "token_ids", "pieces", "stop_reason"},
     "n_context", "query_positions": [...], "rates": {layer: rate},
     "csa": {"layers": [...], "selected": ARRAY int32 [T, L, K], "weights": ARRAY float32 [T, L, K] | null},
     "hca": {"layers": [...], "selected": ARRAY int32 [T, L, H], "weights": ARRAY float32 [T, L, H],
             "whole": {layer: ARRAY float64 [n_context // rate]}},
     "mass": {layer: [window, compressed, sink]},
     "sources": [SOURCE, ...], "token_sources": [[SOURCE, ...] per answer token]}

SOURCE is runtime.provenance.Source as a dict (file, line_start, line_end, weight, layers, snippet,
token_start, token_end). Reading validates every field and says which one is wrong (`TraceError`).

SGLang's layout. What SGLang returns, as read in sgl-project/sglang (stored snapshots, 2026):
- the server flag `--enable-return-indexer-topk` and the per-request flag `"return_indexer_topk": true`
  on the native `/generate` endpoint (not in the OpenAI protocol yet);
- the response field `meta_info["indexer_topk"]`: `pybase64.b64encode(tensor.numpy().tobytes())` of an
  int32 tensor (python/sglang/srt/managers/tokenizer_manager.py; decoded by
  `extract_indexer_topk_from_meta_info` in python/sglang/srt/state_capturer/indexer_topk.py), which
  the client reshapes to (seqlen - 1, num_indexer_layers, index_topk), -1 = padding
  (test/registered/rl/test_return_indexer_topk.py);
- row i is the query at sequence position i: `BaseTopkCapturer.get_topk` returns the rows of positions
  [start_len, seqlen - 1) with start_len 0 (python/sglang/srt/state_capturer/base.py), so the prompt's
  rows come first and the last generated token, never fed, has none;
- for DeepSeek-V4, num_indexer_layers counts the layers with compress_ratio == 4
  (`get_num_indexer_layers` in python/sglang/srt/configs/model_config.py), in layer order; the ids are
  the C4 indexer's raw top-k, i.e. entry ids of the 4:1 compressed sequence (sglang PR #26274 calls
  them "raw C4 indices"): entry w covers tokens [4w, 4w + 4). This last point is our reading of the
  V4 code path, not a documented contract (for DeepSeek-V3.2 the ids are token positions instead).
`to_sglang` writes a /generate-style response {"text", "output_ids", "meta_info": {"indexer_topk",
"prompt_tokens", "completion_tokens", ...}} holding only the answer's rows: it adds
`indexer_topk_start_len` (the first row's position, like SGLang's `routed_experts_start_len`) and
`indexer_topk_shape`, two keys of ours that SGLang does not send; `from_sglang` reads either (a real
response starts at 0). Native byte order is little-endian on every platform SGLang serves from.

A selection loaded from SGLang has ids but no attention weights: the trace then holds `weights=None`
(`trace.weighted` is False), its provenance's values are counts (times each entry was picked; the
per-token "weight" of a pick is 1), the sources are ranked by picks, and there is no HCA or mass
split. Show such a trace with the measure "times picked".

Pure: numpy and the standard library, plus runtime.provenance for the Provenance it builds.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import LonglensError
from .provenance import Provenance, Source, TokenProvenance, rank_sources

FORMAT = "longlens-trace/1"
SGLANG_FIELD = "indexer_topk"  # meta_info key of SGLang's /generate response
SCRIPT_ID = "longlens-trace"  # id of the <script type="application/json"> holding the trace in a report
ORIGINS = ("longlens", "sglang")
SOURCE_KEYS = ("file", "line_start", "line_end", "weight", "layers", "snippet", "token_start", "token_end")
_DTYPES = {"int32": "<i4", "float32": "<f4", "float64": "<f8"}
_CSA_TYPE = "compressed_sparse_attention"  # runtime.config.CSA, spelled here to keep this module light


class TraceError(LonglensError):
    """A trace that cannot be read or does not fit the corpus / model it is shown over."""


# ------------------------------------------------------------------------------------ arrays in JSON
def _pack(a: np.ndarray, dtype: str) -> dict:
    a = np.ascontiguousarray(a, dtype=_DTYPES[dtype])
    return {"dtype": dtype, "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def _unpack(o: Any, where: str, dtype: str, ndim: int) -> np.ndarray:
    if not isinstance(o, dict) or not {"dtype", "shape", "base64"} <= set(o):
        raise TraceError(f"trace field {where!r}: expected an array object with dtype, shape and base64")
    if o["dtype"] != dtype:
        raise TraceError(f"trace field {where!r}: dtype must be {dtype}, got {o['dtype']!r}")
    shape = o["shape"]
    if (not isinstance(shape, list) or len(shape) != ndim
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise TraceError(f"trace field {where!r}: shape must be {ndim} non-negative integers, got {shape!r}")
    raw = _b64(o["base64"], where)
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    if len(raw) != math.prod(shape) * itemsize:
        raise TraceError(f"trace field {where!r}: {len(raw)} bytes of data for shape {shape} "
                         f"({math.prod(shape) * itemsize} expected)")
    return np.frombuffer(raw, dtype=_DTYPES[dtype]).reshape(shape).astype(dtype)  # native order, writable


def _b64(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise TraceError(f"{where}: expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise TraceError(f"{where}: not valid base64 ({e})") from None


# ------------------------------------------------------------------------------------ field readers
def _get(o: dict, key: str, kind, where: str = "", optional: bool = False, default=None):
    path = f"{where}.{key}" if where else key
    if key not in o:
        if optional:
            return default
        raise TraceError(f"trace field {path!r} is missing")
    v = o[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (int in kinds and isinstance(v, bool)) or not isinstance(v, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise TraceError(f"trace field {path!r}: expected {names}, got {type(v).__name__}")
    return v


def _ints(v: Any, path: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise TraceError(f"trace field {path!r}: expected a list of integers")
    return list(v)


def _list(v: Any, path: str) -> list:
    if not isinstance(v, list):
        raise TraceError(f"trace field {path!r}: expected a list")
    return v


def _layer_map(o: Any, path: str) -> dict[int, Any]:
    if not isinstance(o, dict):
        raise TraceError(f"trace field {path!r}: expected an object keyed by layer")
    out = {}
    for k, v in o.items():
        if not re.fullmatch(r"\d+", str(k)):
            raise TraceError(f"trace field {path!r}: key {k!r} is not a layer number")
        out[int(k)] = v
    return out


def _source_dict(s: Source) -> dict:
    return {"file": s.file, "line_start": s.line_start, "line_end": s.line_end, "weight": float(s.weight),
            "layers": [int(l) for l in s.layers], "snippet": s.snippet, "token_start": s.token_start,
            "token_end": s.token_end}


def _source(o: Any, path: str) -> Source:
    if not isinstance(o, dict):
        raise TraceError(f"trace field {path!r}: expected a source object")
    missing = [k for k in SOURCE_KEYS if k not in o]
    if missing:
        raise TraceError(f"trace field {path!r}: missing {', '.join(missing)}")
    ints = {k: o[k] for k in ("line_start", "line_end", "token_start", "token_end")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()):
        raise TraceError(f"trace field {path!r}: line and token bounds must be integers")
    if not isinstance(o["weight"], (int, float)) or isinstance(o["weight"], bool):
        raise TraceError(f"trace field {path!r}: weight must be a number")
    if not isinstance(o["file"], str) or not isinstance(o["snippet"], str):
        raise TraceError(f"trace field {path!r}: file and snippet must be strings")
    return Source(o["file"], ints["line_start"], ints["line_end"], float(o["weight"]),
                  tuple(_ints(o["layers"], f"{path}.layers")), o["snippet"], ints["token_start"], ints["token_end"])


def _docs(v: Any, path: str) -> list[tuple[str, int, int]]:
    if not isinstance(v, list):
        raise TraceError(f"trace field {path!r}: expected a list of [name, start, end]")
    out = []
    for i, d in enumerate(v):
        if (not isinstance(d, (list, tuple)) or len(d) != 3 or not isinstance(d[0], str)
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in d[1:]) or not 0 <= d[1] <= d[2]):
            raise TraceError(f"trace field {path}[{i}]: expected [name, start, end] with 0 <= start <= end")
        out.append((d[0], int(d[1]), int(d[2])))
    return out


def _pad_rows(rows: list[list[tuple[np.ndarray, np.ndarray]]], L: int) -> tuple[np.ndarray, np.ndarray]:
    """[T][L] (ids, weights) -> int32 [T, L, K] ids (-1 padded) and float32 weights (0 padded)."""
    T = len(rows)
    K = max([len(ids) for row in rows for ids, _ in row] + [0])
    sel, w = np.full((T, L, K), -1, np.int32), np.zeros((T, L, K), np.float32)
    for t, row in enumerate(rows):
        for j, (ids, wt) in enumerate(row):
            sel[t, j, :len(ids)] = ids
            w[t, j, :len(ids)] = wt
    return sel, w


# ------------------------------------------------------------------------------------ the trace
@dataclass(eq=False)
class Trace:
    question: str
    answer: str
    answer_ids: list[int]  # per answer token (-1: unknown)
    pieces: list[str]  # each answer token's decoded text ('' where unknown)
    query_positions: list[int]  # context position of the query that produced each answer token
    n_context: int  # context length the entry ids refer to
    offset: int  # context position of the corpus layout's token 0 (the chat preamble before it)
    documents: list[tuple[str, int, int]]  # (name, start, end) in context positions
    rates: dict[int, int]  # layer -> compression rate (CSA and HCA layers)
    csa_layers: list[int]
    selected: np.ndarray  # int32 [T, len(csa_layers), K] entry ids, -1 = padding
    weights: np.ndarray | None = None  # float32 like `selected`; None: ids only (SGLang), values are counts
    hca_layers: list[int] = field(default_factory=list)
    hca_selected: np.ndarray | None = None  # int32 [T, len(hca_layers), H] heaviest entries per token
    hca_weights: np.ndarray | None = None  # float32 like hca_selected
    hca: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> float64 weight per entry, whole answer
    mass: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # layer -> (window, compressed, sink)
    sources: list[Source] = field(default_factory=list)  # whole answer, heaviest first ([]: rank on load)
    token_sources: list[list[Source]] = field(default_factory=list)  # per answer token ([]: rank on load)
    model_name: str = ""
    model: str = ""  # fingerprints ('' unknown): runtime/snapshot.py
    tokenizer: str = ""
    corpus: str = ""
    index_topk: int = 0  # the model's index_topk (0 unknown): the SGLang array's last axis
    stop_reason: str = ""
    origin: str = "longlens"  # or "sglang"

    def __post_init__(self):
        T = len(self.query_positions)
        if self.hca_selected is None:
            self.hca_selected = np.full((T, len(self.hca_layers), 0), -1, np.int32)
        if self.hca_weights is None:
            self.hca_weights = np.zeros(self.hca_selected.shape, np.float32)
        self.answer_ids = list(self.answer_ids) or [-1] * T
        self.pieces = list(self.pieces) or [""] * T
        self.validate()

    @property
    def weighted(self) -> bool:
        """False for a selection without attention weights (SGLang): values are times picked."""
        return self.weights is not None

    @property
    def n_tokens(self) -> int:
        return len(self.query_positions)

    def validate(self) -> None:
        """Raise TraceError at the first inconsistency (shapes, layers, ids beyond the context)."""
        T = self.n_tokens
        if self.origin not in ORIGINS:
            raise TraceError(f"trace origin must be one of {', '.join(ORIGINS)}, got {self.origin!r}")
        if self.n_context < 0 or self.offset < 0:
            raise TraceError("trace n_context and offset must be non-negative")
        if len(self.answer_ids) != T or len(self.pieces) != T:
            raise TraceError(f"trace has {T} query positions but {len(self.answer_ids)} answer token ids and "
                             f"{len(self.pieces)} pieces")
        if any(not 0 <= p < max(self.n_context, 1) for p in self.query_positions):
            raise TraceError(f"trace query positions must lie in the {self.n_context}-token context")
        for name, layers, sel, w in (("csa", self.csa_layers, self.selected, self.weights),
                                     ("hca", self.hca_layers, self.hca_selected, self.hca_weights)):
            if len(set(layers)) != len(layers):
                raise TraceError(f"trace {name} layers repeat: {layers}")
            missing = [l for l in layers if not self.rates.get(l)]
            if missing:
                raise TraceError(f"trace {name} layer(s) {missing} have no compression rate in 'rates'")
            if sel.ndim != 3 or sel.shape[:2] != (T, len(layers)):
                raise TraceError(f"trace {name} selection has shape {list(sel.shape)}; expected "
                                 f"[{T} answer tokens, {len(layers)} layers, top-k]")
            if w is not None and w.shape != sel.shape:
                raise TraceError(f"trace {name} weights have shape {list(w.shape)}, the ids {list(sel.shape)}")
            for j, l in enumerate(layers):
                ids = sel[:, j, :]
                n = self.n_context // self.rates[l]
                bad = (ids < -1) | (ids >= n)
                if bad.any():
                    t, k = (int(x[0]) for x in np.nonzero(bad))
                    raise TraceError(
                        f"trace {name} layer {l}, answer token {t}: entry id {int(ids[t, k])} is outside the "
                        f"{n} entries of a {self.n_context}-token context at rate {self.rates[l]} (-1 pads); "
                        "the trace does not belong to this prompt")
        for l, arr in self.hca.items():
            if l not in self.rates or arr.ndim != 1 or len(arr) != self.n_context // self.rates[l]:
                raise TraceError(f"trace hca weights of layer {l}: expected {self.n_context} // rate entries")
        for l, m in self.mass.items():
            if len(m) != 3:
                raise TraceError(f"trace mass of layer {l}: expected (window, compressed, sink)")
        if self.token_sources and len(self.token_sources) != T:
            raise TraceError(f"trace has {len(self.token_sources)} token source lists for {T} answer tokens")

    # ---------------------------------------------------------------- from an answer
    @classmethod
    def from_provenance(cls, prov: Provenance, question: str, answer: str, *, stop_reason: str = "",
                        model_name: str = "", model: str = "", tokenizer: str = "", corpus: str = "",
                        index_topk: int = 0) -> Trace:
        """The trace of an answer from its provenance (runtime/provenance.py) and its text."""
        csa_layers, hca_layers = sorted(prov.csa), sorted(prov.hca)
        empty = (np.zeros(0, np.int64), np.zeros(0))

        def rows(layers):
            return [[t.entries.get(l, empty) for l in layers] for t in prov.tokens]
        sel, w = _pad_rows(rows(csa_layers), len(csa_layers))
        hsel, hw = _pad_rows(rows(hca_layers), len(hca_layers))
        return cls(question, answer, [t.token_id for t in prov.tokens], [t.text for t in prov.tokens],
                   [t.position for t in prov.tokens], prov.n_context, prov.offset,
                   [(str(n), int(a), int(b)) for n, a, b in prov.docs], dict(prov.rates), csa_layers, sel, w,
                   hca_layers, hsel, hw, {l: np.asarray(prov.hca[l], np.float64) for l in hca_layers},
                   {l: tuple(float(x) for x in m) for l, m in prov.mass.items()}, list(prov.sources),
                   [list(t.sources) for t in prov.tokens], model_name, model, tokenizer, corpus, index_topk,
                   stop_reason)

    @classmethod
    def from_answer(cls, answer, question: str, session=None) -> Trace:
        """The trace of a runtime `Answer` (session.ask's last event) to `question`; `session` (optional)
        gives the model name, the fingerprints and index_topk."""
        if answer.provenance is None:
            raise TraceError("this answer has no provenance to trace (capture was off, or it has no tokens)")
        return cls.from_provenance(answer.provenance, question, answer.text, stop_reason=answer.stop_reason,
                                   **session_info(session))

    # ---------------------------------------------------------------- to the inspector
    def to_provenance(self, layout=None, offset: int | None = None, config=None, top: int = 8,
                      token_top: int = 3) -> Provenance:
        """A runtime Provenance the inspector shows exactly like a live answer's. `layout` (the corpus the
        trace is shown over) must hold the trace's documents at the same token ranges; `offset` and
        `config` (a ModelConfig), when given, must agree with the trace's offset and rates. Without
        stored sources (an SGLang trace) they are ranked here from the selection (needs `layout`)."""
        if offset is not None and offset != self.offset:
            raise TraceError(f"the trace's corpus starts at context position {self.offset}, this session's at "
                             f"{offset}: another chat preamble, the positions would not line up")
        docs = list(self.documents)
        if layout is not None:
            here = [(d.name, d.token_start + self.offset, d.token_end + self.offset) for d in layout.documents]
            if docs and here != docs:
                raise TraceError(corpus_mismatch(docs, here))
            docs = docs or here
        if config is not None:
            wrong = [l for l, r in self.rates.items() if l >= config.num_hidden_layers or config.rate(l) != r]
            if wrong:
                raise TraceError(f"the trace's layer(s) {wrong[:5]} have other compression rates than this model: "
                                 "it was made with another model")
        csa, counts, hca = {}, {}, {}
        for j, l in enumerate(self.csa_layers):
            n = self.n_context // self.rates[l]
            ids = self.selected[:, j, :]
            ok = ids >= 0
            counts[l] = np.bincount(ids[ok], minlength=n)[:n].astype(np.int64)
            csa[l] = (np.bincount(ids[ok], weights=self.weights[:, j, :][ok].astype(np.float64), minlength=n)[:n]
                      if self.weighted else counts[l].astype(np.float64))
        for l in self.hca_layers:
            hca[l] = np.array(self.hca[l], np.float64) if l in self.hca else np.zeros(self.n_context // self.rates[l])
        lo, hi = self.offset, self.offset + (len(layout.ids) if layout is not None else 0)
        tokens = []
        for t in range(self.n_tokens):
            entries, cands = {}, []
            for layers, sel, w in ((self.csa_layers, self.selected, self.weights),
                                   (self.hca_layers, self.hca_selected, self.hca_weights)):
                for j, l in enumerate(layers):
                    ok = sel[t, j] >= 0
                    ids = sel[t, j][ok].astype(np.int64)
                    wt = w[t, j][ok].astype(np.float64) if w is not None else np.ones(len(ids))
                    entries[l] = (ids, wt)
                    cands.append((l, self.rates[l], ids, wt, _corpus_weight(ids, wt, self.rates[l], lo, hi)))
            srcs = (list(self.token_sources[t]) if self.token_sources
                    else rank_sources(cands, layout, self.offset, token_top))
            tokens.append(TokenProvenance(t, self.query_positions[t], self.answer_ids[t], self.pieces[t], entries, srcs))
        sources = list(self.sources)
        if not sources and layout is not None:
            whole = [(l, self.rates[l], np.arange(len(a)), a, _corpus_weight(np.arange(len(a)), a, self.rates[l], lo, hi))
                     for table in (csa, hca) for l, a in table.items()]
            sources = rank_sources(whole, layout, self.offset, top)
        return Provenance(self.n_context, self.offset, dict(self.rates), csa, counts, hca, dict(self.mass), sources,
                          tokens, docs, layout)

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "origin": self.origin,
            "model": {"name": self.model_name, "fingerprint": self.model, "index_topk": self.index_topk},
            "tokenizer": {"fingerprint": self.tokenizer},
            "corpus": {"fingerprint": self.corpus, "offset": self.offset,
                       "documents": [[n, a, b] for n, a, b in self.documents]},
            "question": self.question,
            "answer": {"text": self.answer, "token_ids": list(self.answer_ids), "pieces": list(self.pieces),
                       "stop_reason": self.stop_reason},
            "n_context": self.n_context, "query_positions": list(self.query_positions),
            "rates": {str(l): r for l, r in sorted(self.rates.items())},
            "csa": {"layers": list(self.csa_layers), "selected": _pack(self.selected, "int32"),
                    "weights": None if self.weights is None else _pack(self.weights, "float32")},
            "hca": {"layers": list(self.hca_layers), "selected": _pack(self.hca_selected, "int32"),
                    "weights": _pack(self.hca_weights, "float32"),
                    "whole": {str(l): _pack(a, "float64") for l, a in sorted(self.hca.items())}},
            "mass": {str(l): list(m) for l, m in sorted(self.mass.items())},
            "sources": [_source_dict(s) for s in self.sources],
            "token_sources": [[_source_dict(s) for s in ss] for ss in self.token_sources],
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent)

    def __eq__(self, other) -> bool:
        return isinstance(other, Trace) and self.to_dict() == other.to_dict()

    @classmethod
    def from_dict(cls, o: Any) -> Trace:
        if not isinstance(o, dict):
            raise TraceError(f"a trace is a JSON object, got {type(o).__name__}")
        if "format" not in o:
            if looks_like_sglang(o):
                raise TraceError("this is an SGLang response (meta_info.indexer_topk), not a Longlens trace: "
                                 "read it with from_sglang (command line: --trace-format sglang)")
            raise TraceError(f"not a Longlens trace: no 'format' field (expected {FORMAT!r})")
        if o["format"] != FORMAT:
            raise TraceError(f"unsupported trace format {o['format']!r}: this version reads {FORMAT!r}")
        model, tok, corpus = (_get(o, k, dict) for k in ("model", "tokenizer", "corpus"))
        ans, csa, hca = (_get(o, k, dict) for k in ("answer", "csa", "hca"))
        csa_layers, hca_layers = _ints(_get(csa, "layers", list, "csa"), "csa.layers"), _ints(
            _get(hca, "layers", list, "hca"), "hca.layers")
        weights = _get(csa, "weights", (dict, type(None)), "csa")
        pieces = _get(ans, "pieces", list, "answer")
        if not all(isinstance(p, str) for p in pieces):
            raise TraceError("trace field 'answer.pieces': expected a list of strings")
        mass = {}
        for l, m in _layer_map(_get(o, "mass", dict), "mass").items():
            if (not isinstance(m, list) or len(m) != 3
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in m)):
                raise TraceError(f"trace field 'mass.{l}': expected [window, compressed, sink]")
            mass[l] = tuple(float(x) for x in m)
        rates = {}
        for l, r in _layer_map(_get(o, "rates", dict), "rates").items():
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise TraceError(f"trace field 'rates.{l}': expected a positive integer")
            rates[l] = r
        token_sources = _get(o, "token_sources", list)
        return cls(
            question=_get(o, "question", str), answer=_get(ans, "text", str, "answer"),
            answer_ids=_ints(_get(ans, "token_ids", list, "answer"), "answer.token_ids"), pieces=pieces,
            query_positions=_ints(_get(o, "query_positions", list), "query_positions"),
            n_context=_get(o, "n_context", int), offset=_get(corpus, "offset", int, "corpus"),
            documents=_docs(_get(corpus, "documents", list, "corpus"), "corpus.documents"), rates=rates,
            csa_layers=csa_layers, selected=_unpack(_get(csa, "selected", dict, "csa"), "csa.selected", "int32", 3),
            weights=None if weights is None else _unpack(weights, "csa.weights", "float32", 3),
            hca_layers=hca_layers,
            hca_selected=_unpack(_get(hca, "selected", dict, "hca"), "hca.selected", "int32", 3),
            hca_weights=_unpack(_get(hca, "weights", dict, "hca"), "hca.weights", "float32", 3),
            hca={l: _unpack(a, f"hca.whole.{l}", "float64", 1)
                 for l, a in _layer_map(_get(hca, "whole", dict, "hca"), "hca.whole").items()},
            mass=mass, sources=[_source(s, f"sources[{i}]") for i, s in enumerate(_get(o, "sources", list))],
            token_sources=[[_source(s, f"token_sources[{t}][{i}]") for i, s in enumerate(_list(ss, f"token_sources[{t}]"))]
                           for t, ss in enumerate(token_sources)],
            model_name=_get(model, "name", str, "model"), model=_get(model, "fingerprint", str, "model"),
            tokenizer=_get(tok, "fingerprint", str, "tokenizer"), corpus=_get(corpus, "fingerprint", str, "corpus"),
            index_topk=_get(model, "index_topk", int, "model", optional=True, default=0),
            stop_reason=_get(ans, "stop_reason", str, "answer", optional=True, default=""),
            origin=_get(o, "origin", str, optional=True, default="longlens"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Trace:
        try:
            o = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TraceError(f"a trace must be JSON: {e}") from None
        return cls.from_dict(o)

    def mismatches(self, model: str = "", tokenizer: str = "", corpus: str = "") -> list[str]:
        """What differs from the given fingerprints (empty ones, here or there, are not compared)."""
        out = []
        for what, mine, theirs in (("model", self.model, model), ("tokenizer", self.tokenizer, tokenizer),
                                   ("corpus", self.corpus, corpus)):
            if mine and theirs and mine != theirs:
                out.append(f"the trace was made with another {what}")
        return out


def _corpus_weight(ids: np.ndarray, w: np.ndarray, rate: int, lo: int, hi: int) -> float:
    """Weight on entries whose tokens [id*rate, id*rate+rate) meet the corpus [lo, hi) (as in provenance)."""
    inside = (ids * rate < hi) & (ids * rate + rate > lo)
    return float(np.asarray(w)[inside].sum())


def corpus_mismatch(theirs: Sequence[tuple[str, int, int]], ours: Sequence[tuple[str, int, int]]) -> str:
    """Why a trace's documents do not line up with a corpus, in words."""
    if [d[0] for d in theirs] != [d[0] for d in ours]:
        a, b = [d[0] for d in theirs], [d[0] for d in ours]
        return (f"the trace was made over another corpus: its documents are {', '.join(a[:4])}"
                f"{' …' if len(a) > 4 else ''}, this corpus has {', '.join(b[:4]) or 'none'}{' …' if len(b) > 4 else ''}")
    i = next(i for i, (x, y) in enumerate(zip(theirs, ours)) if x != y)
    return (f"the trace was made over another version of the corpus (or another tokenizer): {theirs[i][0]} spans "
            f"context tokens {theirs[i][1]}-{theirs[i][2]} there, {ours[i][1]}-{ours[i][2]} here")


def session_info(session) -> dict:
    """Model name, fingerprints and index_topk of a runtime Session (empty without one)."""
    if session is None:
        return {}
    eng = session.engine
    info = {"model_name": eng.model_dir.name if getattr(eng, "model_dir", None) else "",
            "index_topk": int(eng.config.index_topk)}
    try:
        fp = session.fingerprints()
        info.update(model=fp.model, tokenizer=fp.tokenizer, corpus=fp.corpus)
    except (LonglensError, OSError):  # e.g. a tokenizer not loaded from a file: no fingerprint
        pass
    return info


# ------------------------------------------------------------------------------------ SGLang
def looks_like_sglang(o: Any) -> bool:
    """A /generate response (or its meta_info, or a batch of one) carrying indexer_topk."""
    if isinstance(o, list) and len(o) == 1:
        o = o[0]
    return isinstance(o, dict) and (SGLANG_FIELD in o or (isinstance(o.get("meta_info"), dict)
                                                          and SGLANG_FIELD in o["meta_info"]))


def to_sglang(trace: Trace, index_topk: int | None = None) -> dict:
    """The trace's CSA selection as SGLang's /generate response carries it: int32
    [answer tokens, CSA layers, top-k] (-1 padding; top-k padded to `index_topk`, default the trace's),
    base64, in meta_info.indexer_topk, rows from the first answer query on (indexer_topk_start_len)."""
    q = list(trace.query_positions)
    if q and q != list(range(q[0], q[0] + len(q))):
        raise TraceError("SGLang's layout needs consecutive query positions (one answer, token by token)")
    T, L, K = trace.selected.shape
    width = max(K, index_topk if index_topk is not None else trace.index_topk)
    arr = np.full((T, L, width), -1, np.int32)
    arr[:, :, :K] = trace.selected
    prompt = q[0] + 1 if q else trace.n_context
    meta = {SGLANG_FIELD: base64.b64encode(arr.astype("<i4").tobytes()).decode("ascii"),
            "prompt_tokens": prompt, "completion_tokens": T,
            "indexer_topk_start_len": prompt - 1 if q else prompt, "indexer_topk_shape": [T, L, width]}
    return {"text": trace.answer, "output_ids": list(trace.answer_ids), "meta_info": meta}


def from_sglang(obj: Any, config=None, *, csa_layers: Sequence[int] | None = None, rates: dict | None = None,
                index_topk: int | None = None, prompt_tokens: int | None = None, start: int | None = None,
                n_context: int | None = None, question: str = "", answer: str | None = None,
                answer_ids: Sequence[int] | None = None, tokenizer=None, documents: Sequence = (), offset: int = 0,
                model_name: str = "", model: str = "", tokenizer_fp: str = "", corpus: str = "") -> Trace:
    """A trace from SGLang's `--enable-return-indexer-topk` output: `obj` is a /generate response (a dict
    with meta_info, or a batch of one, or its JSON text), its meta_info, or the base64 string itself.

    The layer axis is the model's CSA layers in order: from `config` (the model SGLang served, a
    ModelConfig: CSA layers, rates and index_topk) or `csa_layers` + `rates`. Row i is the query at
    position `start` + i (meta_info's indexer_topk_start_len, else 0, as SGLang sends it); answer token
    k came from the query at `prompt_tokens` - 1 + k. `documents` / `offset` place the corpus (as a
    session gives them: session.docs(), session.offset); `tokenizer` (optional) decodes the pieces."""
    if isinstance(obj, (bytes, str)):
        text = obj.decode() if isinstance(obj, bytes) else obj
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = {SGLANG_FIELD: text.strip()}  # the base64 string itself
    if isinstance(obj, list):
        if len(obj) != 1:
            raise TraceError(f"a batch of {len(obj)} SGLang responses: pass one")
        obj = obj[0]
    if not looks_like_sglang(obj):
        raise TraceError("no meta_info.indexer_topk here: send the request with \"return_indexer_topk\": true to "
                         "an SGLang server started with --enable-return-indexer-topk")
    meta = obj["meta_info"] if isinstance(obj.get("meta_info"), dict) else obj
    if config is not None:
        csa_layers = [l for l, t in enumerate(config.layer_types) if t == _CSA_TYPE]
        rates = {l: config.rate(l) for l in range(config.num_hidden_layers) if config.rate(l)}
        index_topk = config.index_topk if index_topk is None else index_topk
    if not csa_layers or not rates:
        raise TraceError("which layers the rows hold is unknown: pass the model's config (or csa_layers and rates)")
    L = len(csa_layers)

    raw = meta[SGLANG_FIELD]
    if isinstance(raw, list):  # already decoded by a client
        try:
            arr = np.asarray(raw, dtype=np.int64)
        except (ValueError, TypeError):
            raise TraceError("meta_info.indexer_topk: a list, but not a regular [rows, layers, top-k] array") from None
    else:
        data = _b64(raw, "meta_info.indexer_topk")
        if len(data) % 4:
            raise TraceError(f"meta_info.indexer_topk: {len(data)} bytes is not a whole number of int32 values")
        arr = np.frombuffer(data, dtype="<i4").astype(np.int64)

    prompt = prompt_tokens if prompt_tokens is not None else meta.get("prompt_tokens")
    if not isinstance(prompt, int) or isinstance(prompt, bool) or prompt < 1:
        raise TraceError("the prompt's length is unknown (meta_info.prompt_tokens): pass prompt_tokens")
    start = start if start is not None else meta.get("indexer_topk_start_len", 0)
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= prompt:
        raise TraceError(f"indexer_topk_start_len must be between 0 and prompt_tokens, got {start!r}")
    if answer_ids is None and isinstance(obj.get("output_ids"), list):
        answer_ids = obj["output_ids"]
    T = len(answer_ids) if answer_ids is not None else meta.get("completion_tokens")
    if not isinstance(T, int) or T < 0:
        raise TraceError("the answer's length is unknown (no output_ids or meta_info.completion_tokens): pass answer_ids")

    shape = meta.get("indexer_topk_shape")
    if arr.ndim == 3:
        shape = list(arr.shape)
    elif isinstance(shape, list) and len(shape) == 3:
        pass
    else:
        K = index_topk
        if not K:
            rows = prompt + T - 1 - start
            K = arr.size // max(rows * L, 1) if rows > 0 else 0
        shape = [arr.size // max(L * K, 1), L, K]
    if shape[1] != L or math.prod(shape) != arr.size:
        raise TraceError(f"meta_info.indexer_topk holds {arr.size} int32 values: not [rows x {L} CSA layers x "
                         f"{shape[2]} top-k]; was it made by this model (its CSA layers {list(csa_layers)}, index_topk "
                         f"{index_topk})?")
    arr = arr.reshape(shape)
    first = prompt - 1 - start  # row of the first answer token's query
    if T and (first < 0 or arr.shape[0] < first + T):
        raise TraceError(f"meta_info.indexer_topk has {arr.shape[0]} rows from position {start}; the answer's "
                         f"{T} queries need rows up to position {prompt - 2 + T}")
    sel = arr[first:first + T] if T else arr[:0]
    if (sel < -1).any():
        raise TraceError("meta_info.indexer_topk holds ids below -1 (the padding value)")
    sel = sel.astype(np.int32)
    q = [prompt - 1 + k for k in range(T)]
    n_context = n_context if n_context is not None else (q[-1] + 1 if q else prompt)
    ids = [int(x) for x in answer_ids] if answer_ids is not None else [-1] * T
    pieces = [""] * T
    if tokenizer is not None and answer_ids is not None:
        dec = tokenizer.stream_decoder()
        pieces = [dec.feed(i) for i in ids]
    if answer is None:
        answer = obj.get("text") if isinstance(obj.get("text"), str) else "".join(pieces)
    return Trace(question, answer, ids, pieces, q, n_context, offset, [tuple(d) for d in documents], dict(rates),
                 list(csa_layers), sel, None, [], None, None, {}, {}, [], [], model_name, model, tokenizer_fp,
                 corpus, int(index_topk or shape[2]), "", "sglang")


# ------------------------------------------------------------------------------------ files
def trace_from_html(text: str) -> Trace:
    """The trace a Longlens HTML report embeds (runtime/report.py)."""
    m = re.search(r'<script type="application/json" id="' + SCRIPT_ID + r'">(.*?)</script>', text, re.S)
    if not m:
        raise TraceError("no Longlens trace in this HTML file (not a Longlens report?)")
    return Trace.from_json(m.group(1))


def read_trace(path: str | Path, fmt: str = "auto", **sglang) -> Trace:
    """A trace from a file: a Longlens trace (.json), a Longlens HTML report, or an SGLang response
    (`fmt` "sglang", or auto-detected; `sglang` are from_sglang's keywords: config, documents, ...)."""
    if fmt not in ("auto", "longlens", "sglang"):
        raise TraceError(f"unknown trace format {fmt!r} (longlens, sglang or auto)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text file") from None
    head = text.lstrip()[:200].lower()
    if fmt != "sglang" and (head.startswith("<!doctype") or head.startswith("<html")):
        return trace_from_html(text)
    if fmt == "longlens":
        return Trace.from_json(text)
    try:
        o = json.loads(text)
    except json.JSONDecodeError:
        o = None
    if fmt == "sglang" or (o is not None and looks_like_sglang(o)):
        return from_sglang(text if o is None else o, **sglang)
    return Trace.from_json(text)


def write_trace(path: str | Path, trace: Trace, fmt: str = "longlens") -> Path:
    """Write `trace` as Longlens JSON or as an SGLang response (see to_sglang)."""
    if fmt not in ("longlens", "sglang"):
        raise TraceError(f"unknown trace format {fmt!r} (longlens or sglang)")
    text = trace.to_json() if fmt == "longlens" else json.dumps(to_sglang(trace))
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


__all__ = ["FORMAT", "SCRIPT_ID", "SGLANG_FIELD", "Trace", "TraceError", "corpus_mismatch", "from_sglang",
           "looks_like_sglang", "read_trace", "session_info", "to_sglang", "trace_from_html", "write_trace"]
