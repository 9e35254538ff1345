"""Baseline: remove the last k removable decoder layers (no data needed)."""

from __future__ import annotations

from workers.engine.methods.layer_common import (
    LayerMethodOptions,
    Selection,
    SelectorInput,
    candidate_layers,
    one_shot_decisions,
    register_layer_method,
)


class LastKOptions(LayerMethodOptions):
    """Options of `last_k` (only the shared ones: compensation, micro-batching, protected layers)."""


def _last_k(n_layers: int, k: int, options: LayerMethodOptions) -> list[int]:
    return sorted(candidate_layers(n_layers, k, options)[-k:])


def select(inp: SelectorInput) -> Selection:
    # Importance = distance from the end, so the last candidate is the least important.
    scores = {layer: float(rank) for rank, layer in enumerate(reversed(inp.candidates))}
    removed, decisions = one_shot_decisions(scores, inp.k)
    assert removed == _last_k(inp.n_layers, inp.k, inp.ctx.options)
    return Selection(removed=removed, decisions=decisions)


register_layer_method(
    "last_k",
    "Remove the last k decoder layers (baseline; no calibration needed).",
    LastKOptions,
    select,
    deterministic=_last_k,
)
