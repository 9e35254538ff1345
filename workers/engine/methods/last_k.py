"""Baseline: remove the last k removable decoder layers (no data needed)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from workers.engine.methods.layer_common import (
    LayerMethodOptions,
    Selection,
    SelectorInput,
    candidate_layers,
    one_shot_decisions,
    plan_layer_method,
    run_layer_method,
)
from workers.engine.registry import Method, register
from workers.engine.types import PruneContext, PruneOutcome, SparsityBasis


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


def run(ctx: PruneContext) -> PruneOutcome:
    return run_layer_method(ctx, select, "last_k")


def plan(config: PretrainedConfig, target: float, basis: SparsityBasis, options: LastKOptions) -> dict[str, Any]:
    return plan_layer_method(config, target, basis, options, name="last_k", deterministic=_last_k)


register(
    Method(
        name="last_k",
        kind="layer",
        description="Remove the last k decoder layers (baseline; no calibration needed).",
        options_model=LastKOptions,
        run=run,
        plan=plan,
    )
)
