"""The fast decode step: one new token through the model in a few compiled regions; the eager model stays
the reference.

A decode step of the eager model is hundreds of tiny ops (mHC's Sinkhorn iterations alone are ~120 per
sub-layer), each a few microseconds of dispatch for a few hundred bytes of work. For one token most of the
step has shapes that do not depend on the context, so it is cut at the points that do:

    region 0      embedding -> streams; layer 0's attention input (mHC weights + Sinkhorn, collapse, norm,
                  q / kv projections and RoPE, compressor and indexer projections, indexer queries)
    eager         per layer: window update, compressor pooling, indexer scores + top-k, attention over the
                  window and the picked / HCA entries (Attention._sparse: shapes grow with the context)
    region i+1    layer i's output projection, mHC expand, the FFN's mHC, gate, shared and routed experts,
                  mHC expand, then layer i+1's attention input -- or, after the last layer, the hyper-head,
                  final norm and vocabulary head

Each region is traced once (make_fx, the parameters it reads as inputs) and compiled by inductor, on CPU its
C++ backend as gpt-fast compiles its decode step: pointwise work and small reductions (Sinkhorn, norms, RoPE,
one-row projections) fuse into a few C++ loops; the vocabulary head stays a BLAS call. It is called without
TorchDynamo: no guards to evaluate per call (with them, a call cost ~10x the region's work here). Regions
are the model's own methods (Block._hc, Attention.queries / output, Gate, Expert, ...), so the fast step
cannot drift from the reference; the eager part calls Attention._sparse itself.

Compiling happens at the first decode step (or in `enable`), once per process and batch size: for the shipped
model on this 2-core machine (Intel Xeon with AMX) 26 s with new graphs and 58 s with an empty inductor cache
directory (its headers are built too), 6-8 s once the graphs are in inductor's on-disk cache (a later process,
the same model shapes); later steps reuse them at every context length.

Routed experts: with few experts (<= DENSE_EXPERTS) every expert runs on the token inside the region and
the unpicked ones are weighted by exact zeros (the same sum, in the same order, as the eager loop, and no
data-dependent shapes); with more, the region ends after the gate and the eager MoE.routed runs in between.

Numerics: compiled, the fused loops round differently from eager kernels (reduction order, exp/sigmoid
implementations): logits agree to ~1e-6 relative, not bitwise (tests/test_compiled.py states the bound and
checks the CSA picks and greedy tokens are identical); two index scores or logits closer than that can still
swap, as with bf16 indexer keys. Uncompiled (`compile=False`), the same regions run as plain eager code and
match the reference model bit for bit (at batch size 1 with dense experts: over B rows the experts' matmuls
see all rows, the eager loop only the routed ones).

    model.decode(ids, cache, capture)  # runtime.model.Transformer: this step when model.decode_impl == "fast"
    runtime.compiled.enable(model)     # decode_impl = "fast" and compile now (a warm-up on a scratch cache)
    runtime.compiled.disable(model)    # back to the eager forward
    runtime.compiled.warm(model)       # build it now if the model decodes through it (Engine.warm_up: in a thread)

The fast step applies to one token per sequence on CPU, outside autograd, without a process group (tensor /
expert parallel models run eagerly: their all_reduce calls stay in the eager forward), with the sparse
attention path and no timing hooks attached (a LayerTimer times the eager modules); anything else, and any
model after a failed compile (no C++ compiler, an unsupported op), decodes through the eager forward,
with one warning saying why. A steered step (a counterfactual's forced CSA selection, runtime/steering.py's
`Steered.decode`) takes it too: the steering only changes the eager middle's top-k.
"""

from __future__ import annotations

import time
import warnings

import torch

from .layers import hc_collapse, hc_expand, rope_cos_sin

DENSE_EXPERTS = 8  # routed experts computed densely inside the region up to this many experts per layer
# inductor's own pass turning one-row matmuls (K, N <= 2048) into fused multiply-reduce loops: measured here
# ~10% off the step against a BLAS call per projection (the vocabulary head stays a BLAS call)
INDUCTOR_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}


# ---------------------------------------------------------------------------------------------
# Region bodies: plain functions of the model's modules and tensors (one token per sequence, S = 1).

def _mix(block, site: str, streams: torch.Tensor):
    """A sub-layer's mHC input: (normed collapsed input [B, 1, D], post [B, 1, n], comb [B, 1, n, n])."""
    pre, post, comb = block._hc(site, streams)
    norm = block.attn_norm if site == "attn" else block.ffn_norm
    return norm(hc_collapse(streams, pre)), post, comb


def _attn_in(block, streams: torch.Tensor, pos: torch.Tensor):
    """Everything of layer `block`'s attention that precedes the cache: (post, comb, cos, sin, kv, q, proj)
    with proj = compressor (kv, gate) projections, then the indexer's compressor (kv, gate) and queries."""
    x, post, comb = _mix(block, "attn", streams)
    a = block.attn
    cos, sin = rope_cos_sin(a.inv_freq, pos, x.dtype)  # [1, r/2]
    kv = a.kv_row(x, cos, sin)  # [B, 1, d]
    cq, q = a.queries(x, cos, sin)
    proj = ()
    if a.compressor is not None:
        proj += (a.compressor.wkv(x), a.compressor.wgate(x))
    if a.indexer is not None:
        ic = a.indexer.compressor
        proj += (ic.wkv(x), ic.wgate(x), *a.indexer.queries(x, cq, cos, sin))
    return post, comb, cos, sin, kv, q, proj


def _enter(nxt, streams: torch.Tensor, pos: torch.Tensor):
    """What follows a layer: (streams, the next block's attention input), or (nxt is the model) the logits
    [B, 1, V]."""
    if hasattr(nxt, "attn"):
        return streams, _attn_in(nxt, streams, pos)
    return nxt.head(nxt.norm(nxt.hyper_head(streams))).float()


def _first(model, ids: torch.Tensor, pos: torch.Tensor):
    return _enter(model.layers[0], model.streams(ids), pos)  # streams [B, 1, n, D]


def _ffn_in(block, streams, o, cos, sin, post, comb, ids):
    """Attention output -> streams, then the FFN's input: (streams, x [N, D], post, comb, w [N, k], idx [N, k],
    shared expert [N, D])."""
    streams = hc_expand(streams, block.attn.output(o, cos, sin), post, comb)
    x, post, comb = _mix(block, "ffn", streams)
    moe = block.ffn
    x = x.reshape(-1, x.shape[-1])
    w, idx = moe.gate(x, ids.reshape(-1))
    return streams, x, post, comb, w, idx, moe.shared_experts(x)


def _ffn_out(nxt, streams, routed, shared, post, comb, pos):
    y = (routed + shared).view(streams.shape[0], 1, -1)  # MoE.forward's sum
    return _enter(nxt, hc_expand(streams, y, post, comb), pos)


def _layer_dense(block, nxt, streams, o, cos, sin, post, comb, ids, pos):
    """The whole of a layer after its attention core, experts included, then `_enter(nxt)`."""
    streams, x, post, comb, w, idx, shared = _ffn_in(block, streams, o, cos, sin, post, comb, ids)
    routed = torch.zeros_like(x)
    for e in range(block.ffn.n_experts):  # ascending, as MoE.routed adds them; unpicked ones weigh exactly 0
        we = (w * (idx == e)).sum(-1, keepdim=True)
        routed = routed + block.ffn.experts[str(e)](x) * we
    return _ffn_out(nxt, streams, routed, shared, post, comb, pos)


def _attend(attn, lc, pos, kv, q, proj, capture, steering=None):
    """The eager middle of a layer: the cache grows by the token, then Attention._sparse -> o [B, 1, H, d].
    `steering` forces the CSA selection as in Attention.forward."""
    keys = attn.extend_window(lc, kv)
    entries = iq = iw = ikeys = steer = None
    if attn.compressor is not None:
        attn.compressor.absorb(proj[0], proj[1], lc.kv, attn.inv_freq)
        entries = lc.kv.entries.view()
    if attn.indexer is not None:
        attn.indexer.compressor.absorb(proj[2], proj[3], lc.index, attn.inv_freq)
        ikeys = lc.index.entries.view()
        iq, iw = proj[4], proj[5]
        if steering is not None and not steering.empty:
            steer = (steering.index_topk or attn.indexer.topk,
                     *steering.entry_masks(entries.shape[1], attn.rate, q.device))
    return attn._sparse(q, keys, pos, entries, iq, iw, ikeys, capture, steer)


class _Deferred:
    """Stands in for a Capture during a fast step: its records reach the real one only if the step succeeds."""

    def __init__(self):
        self.calls = []

    def add(self, *args) -> None:
        self.calls.append(args)


# ---------------------------------------------------------------------------------------------

class _Region:
    """One region of the step for one layer: body(model, *tensors) -> flat tuple of tensors, traced once with
    the parameters it reads as inputs (make_fx) and compiled by inductor (torch._inductor.compile: no
    TorchDynamo, so no guards to evaluate per call -- with them a call cost ~10x the region's work). The
    parameters are fetched from their modules at every call, so the region always sees the model's own
    tensors. Shapes are fixed at the first call (a step's are: the caller builds a region per batch size)."""

    def __init__(self, model, body, options: dict | None = None):
        self.model, self.body, self.options = model, body, options
        self.fn = self.sources = None

    def __call__(self, *acts):
        if self.fn is None:
            self._build(acts)
        return self.fn(*[getattr(mod, leaf) for mod, leaf in self.sources], *acts)

    def _build(self, acts) -> None:
        import torch._inductor
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.func import functional_call
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        bound = _Bound(self.model, self.body)
        state = dict(bound.named_parameters()) | dict(bound.named_buffers())
        names = list(state)

        def flat(*ts):
            return functional_call(bound, dict(zip(names, ts[:len(names)])), tuple(ts[len(names):]))

        # functional_call swaps the model's parameters for the tracer's while it runs: the build happens
        # inside a decode step, under the caller's lock (the engine holds its lock for every forward)
        gm = make_fx(flat, tracing_mode="fake")(*state.values(), *acts)  # fake: ~2 s less than real tensors
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        used = []
        for name, node in zip(names, placeholders):  # only the parameters this region reads stay inputs
            if node.users:
                used.append(name)
            else:
                gm.graph.erase_node(node)
        gm.recompile()
        self.sources = []
        for name in used:
            path, _, leaf = name.rpartition(".")
            self.sources.append((bound.get_submodule(path), leaf))
        # fake example inputs with a shape environment: inductor then looks the graph up in its on-disk
        # cache (real inputs bypass it), so a later process skips the C++ compile
        fake = FakeTensorMode(shape_env=ShapeEnv())
        example = [fake.from_tensor(t, static_shapes=True) for t in [state[n] for n in used] + list(acts)]
        self.fn = torch._inductor.compile(gm, example, options=self.options)


class _Bound(torch.nn.Module):
    """The model as a submodule (its parameters named `model.*`) and a region body as forward, for tracing."""

    def __init__(self, model, body):
        super().__init__()
        self.model, self.body = model, body

    def forward(self, *acts):
        return self.body(self.model, *acts)


class FastDecode:
    """One-token decode steps for a runtime.model.Transformer: `step(ids [B, 1], cache, capture)` -> logits
    [B, 1, vocab], or None where it does not apply (the caller then runs the eager forward).

    compile=False runs the same regions uncompiled (bit-identical to the eager model: what the tests check
    the restructuring with). After a failure the step rewinds the cache, warns once and stays off."""

    def __init__(self, model, compile: bool = True, options: dict | None = None):
        self.model, self.compiled = model, compile
        self.options = INDUCTOR_OPTIONS if options is None else options  # inductor config for the regions
        self.failed: str | None = None
        self.compile_seconds = 0.0  # wall time of the steps that built regions (tracing + compiling)
        self.dense = model.config.n_routed_experts <= DENSE_EXPERTS
        self._regions: dict[tuple, object] = {}  # (batch size, region name, layer) -> callable
        self._hooked = [model, *model.layers, *(b.attn for b in model.layers), *(b.ffn for b in model.layers)]

    def applies(self, ids: torch.Tensor, cache) -> bool:
        m = self.model
        return (self.failed is None and ids.shape[1] == 1 and ids.shape[0] == cache.batch_size
                and not m.shard.active and m.attn_impl == "sparse" and not torch.is_grad_enabled()
                and (not self.compiled or m.device.type == "cpu")
                and m.timer is None and not any(x._forward_hooks or x._forward_pre_hooks for x in self._hooked))

    def __call__(self, ids: torch.Tensor, cache, capture=None, steering=None) -> torch.Tensor | None:
        if not self.applies(ids, cache):
            return None
        if cache.length + 1 > self.model.config.max_position_embeddings:
            return None  # the eager forward raises its error
        mark, deferred = cache.mark(), None if capture is None else _Deferred()
        built, t0 = len(self._regions), time.perf_counter()
        try:
            out = self._step(ids, cache, deferred, steering)
        except Exception as e:  # noqa: BLE001 -- a failed compile, or an op it cannot take: said once, then eager
            cache.rewind(mark)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.fail(f"{type(e).__name__}: {msg}")
            return None
        if len(self._regions) > built:
            self.compile_seconds += time.perf_counter() - t0
        if deferred is not None:
            for args in deferred.calls:
                capture.add(*args)
        return out

    def fail(self, reason: str) -> None:
        self.failed = reason
        warnings.warn(f"runtime.compiled: the compiled decode step failed ({reason}); decoding with the eager "
                      "model from now on", RuntimeWarning, stacklevel=3)

    def _region(self, B: int, name: str, layer: int = 0):
        key = (B, name, layer)
        fn = self._regions.get(key)
        if fn is None:
            body = _bodies(name, layer, len(self.model.layers))
            fn = _Region(self.model, body, self.options) if self.compiled else (lambda *a, _b=body: _b(self.model, *a))
            self._regions[key] = fn
        return fn

    def _step(self, ids, cache, capture, steering=None):
        m, B = self.model, ids.shape[0]
        pos = torch.arange(cache.length, cache.length + 1, device=ids.device)  # [1]
        streams, post, comb, cos, sin, kv, q, *proj = self._region(B, "first")(ids, pos)
        last = len(m.layers) - 1
        for i, (block, lc) in enumerate(zip(m.layers, cache.layers)):
            o = _attend(block.attn, lc, pos, kv, q, proj, capture, steering).contiguous()
            if self.dense:
                out = self._region(B, "layer", i)(streams, o, cos, sin, post, comb, ids, pos)
            else:
                streams, x, p2, c2, w, idx, shared = self._region(B, "ffn_in", i)(streams, o, cos, sin, post,
                                                                                  comb, ids)
                out = self._region(B, "ffn_out", i)(streams, block.ffn.routed(x, w, idx), shared, p2, c2, pos)
            if i < last:
                streams, post, comb, cos, sin, kv, q, *proj = out
        cache.length += 1
        return out[0]


def _bodies(name: str, i: int, n_layers: int):
    """The body of region `name` for layer i: body(model, *tensors) -> a flat tuple of tensors."""
    nxt = lambda m: m if i == n_layers - 1 else m.layers[i + 1]  # noqa: E731
    if name == "first":
        return lambda m, ids, pos: _flat(_first(m, ids, pos))
    if name == "layer":
        return lambda m, *a: _flat(_layer_dense(m.layers[i], nxt(m), *a))
    if name == "ffn_in":
        return lambda m, *a: _ffn_in(m.layers[i], *a)
    return lambda m, *a: _flat(_ffn_out(nxt(m), *a))


def _flat(out) -> tuple:
    """(streams, (post, comb, cos, sin, kv, q, proj)) -> (streams, post, ..., q, *proj); logits -> (logits,)."""
    if isinstance(out, torch.Tensor):
        return (out,)
    streams, (post, comb, cos, sin, kv, q, proj) = out
    return (streams, post, comb, cos, sin, kv, q, *proj)


# ---------------------------------------------------------------------------------------------

def enable(model, compile: bool = True, warmup: bool = True) -> FastDecode:
    """Decode `model` (a Transformer) through the fast step from now on (model.decode_impl = "fast").

    warmup: compile now, on a scratch cache, and check its logits against the eager forward's (a mismatch
    or a failure turns the fast step off with one warning). Without it the first decode step compiles."""
    fast = FastDecode(model, compile)
    model.decode_impl, model.fast_decode = "fast", fast
    if warmup:
        _warm_up(model, fast)
    return fast


def pending(model) -> bool:
    """Whether `model` decodes through the compiled step and has not built it yet: what `warm` would do."""
    fast = getattr(model, "fast_decode", None)
    return (getattr(model, "decode_impl", "eager") == "fast" and not model.shard.active
            and model.device.type == "cpu" and (fast is None or (fast.failed is None and not fast._regions)))


def warm(model) -> FastDecode | None:
    """Build `model`'s compiled step now, as its first decode step would (checked against the eager forward
    on a scratch cache), so the first answer does not wait for it. The caller holds the engine's lock."""
    if not pending(model):
        return model.fast_decode
    if model.fast_decode is None:
        model.fast_decode = FastDecode(model)
    _warm_up(model, model.fast_decode)
    return model.fast_decode


def disable(model) -> None:
    model.decode_impl, model.fast_decode = "eager", None


def _warm_up(model, fast: FastDecode, tol: float = 1e-4) -> None:
    ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    with torch.no_grad():
        got = fast(ids, model.new_cache(1))
        if got is None:
            return  # not applicable here (device, process group...) or already failed and said so
        want = model(ids, model.new_cache(1), logits_to_keep=1)
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))
    if not err <= tol:
        fast.fail(f"warm-up logits differ from the eager model's by {err:.2e} (relative)")


__all__ = ["DENSE_EXPERTS", "FastDecode", "disable", "enable", "pending", "warm"]
