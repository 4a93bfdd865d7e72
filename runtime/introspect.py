"""Selection capture: what each attention layer looked at, for heatmaps and provenance.

Pass `capture=Capture()` to `model(...)`; it is off (None) by default and then costs nothing.
Per attention layer and query position it records
- `mass` [B, S, 3]: the head-averaged share of attention that went to the sliding window, the
  compressed entries and the sink;
- CSA layers: `selected` [B, S, K] entry ids picked by the lightning indexer (-1 = no pick),
  their index `scores`, and `weights` (head-averaged attention probability of each pick);
- HCA layers: `weights` [B, S, N] over all visible 128-token entries.
Entry w of a layer with rate m covers tokens [w*m, (w+1)*m) (CSA pools also read the previous
window's first half; provenance attributes an entry to its own window).
Records are detached CPU copies; capture never changes the numerics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import CSA


@dataclass
class LayerRecord:
    layer: int
    layer_type: str
    positions: torch.Tensor  # [S] absolute query positions
    mass: torch.Tensor  # [B, S, 3] window / compressed / sink
    selected: torch.Tensor | None = None  # [B, S, K] (CSA)
    scores: torch.Tensor | None = None  # [B, S, K] (CSA)
    weights: torch.Tensor | None = None  # [B, S, K] (CSA) or [B, S, N] (HCA)


class Capture:
    def __init__(self):
        self._parts: dict[int, list[LayerRecord]] = {}

    def add(self, layer, layer_type, positions, mass, selected, scores, weights) -> None:
        cpu = lambda t: None if t is None else t.detach().to("cpu", copy=True)
        if layer_type == CSA and selected is None:  # no entry existed yet: an empty selection
            selected = torch.full((*mass.shape[:2], 0), -1, dtype=torch.long)
            scores, weights = selected.float(), selected.float()
        self._parts.setdefault(layer, []).append(LayerRecord(
            layer, layer_type, cpu(positions), cpu(mass).float(), cpu(selected),
            None if scores is None else cpu(scores).float(), None if weights is None else cpu(weights).float()))

    @property
    def layers(self) -> list[int]:
        return sorted(self._parts)

    def clear(self) -> None:
        self._parts.clear()

    def record(self, layer: int) -> LayerRecord:
        """All calls' records of one layer joined along the query axis (HCA weights zero-padded to the widest)."""
        parts = self._parts[layer]
        if len(parts) == 1:
            return parts[0]
        cat = lambda xs: None if xs[0] is None else torch.cat(xs, dim=1)
        weights = [p.weights for p in parts]
        if weights[0] is not None and parts[0].selected is None:
            width = max(w.shape[-1] for w in weights)
            weights = [torch.nn.functional.pad(w, (0, width - w.shape[-1])) for w in weights]
        if parts[0].selected is not None:  # K can differ while fewer than index_topk entries exist
            width = max(p.selected.shape[-1] for p in parts)
            pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=v)
            sel = torch.cat([pad(p.selected, -1) for p in parts], dim=1)
            scr = torch.cat([pad(p.scores, float("-inf")) for p in parts], dim=1)
            weights = [pad(w, 0.0) for w in weights]
        else:
            sel = scr = None
        return LayerRecord(layer, parts[0].layer_type, torch.cat([p.positions for p in parts]),
                           cat([p.mass for p in parts]), sel, scr, cat(weights))


def span_ranks(capture: Capture, config, query: int, spans) -> list[list[int | None]]:
    """Per token span [a, b), per CSA layer that captured the query at position `query`: the best 1-based
    rank (by index score) among that query's top-k picks of an entry covering the span, or None (entry w
    of rate m covers tokens [w*m, (w+1)*m)). How `eval niah` and the needle grid read selection."""
    out: list[list[int | None]] = [[] for _ in spans]
    m = config.compress_rates[CSA]
    for layer in capture.layers:
        if config.layer_types[layer] != CSA:
            continue
        rec = capture.record(layer)
        row = (rec.positions == query).nonzero()
        if len(row) == 0:
            continue
        sel, scores = rec.selected[0, int(row[0, 0])], rec.scores[0, int(row[0, 0])]
        rank_of: dict[int, int] = {}
        for r, j in enumerate(torch.argsort(scores, descending=True, stable=True).tolist()):
            e = int(sel[j])
            if e >= 0 and e not in rank_of:
                rank_of[e] = r + 1
        for k, (a, b) in enumerate(spans):
            hits = [rank_of[w] for w in range(a // m, (b - 1) // m + 1) if w in rank_of]
            out[k].append(min(hits) if hits else None)
    return out
