"""Baseline: remove k layers chosen uniformly at random (seeded by the job's seed)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig

from workers.engine.methods.layer_common import (
    LayerMethodOptions,
    Selection,
    SelectorInput,
    one_shot_decisions,
    plan_layer_method,
    run_layer_method,
)
from workers.engine.registry import Method, register
from workers.engine.types import PruneContext, PruneOutcome, SparsityBasis


class RandomOptions(LayerMethodOptions):
    """Only the shared options; the draw depends on the job's `seed`."""


def select(inp: SelectorInput) -> Selection:
    generator = torch.Generator().manual_seed(inp.ctx.seed)
    draws = torch.rand(len(inp.candidates), generator=generator).tolist()
    scores = dict(zip(inp.candidates, draws, strict=True))
    removed, decisions = one_shot_decisions(scores, inp.k)
    return Selection(removed=removed, decisions=decisions, extra={"score": "uniform_random", "seed": inp.ctx.seed})


def run(ctx: PruneContext) -> PruneOutcome:
    return run_layer_method(ctx, select, "random")


def plan(config: PretrainedConfig, target: float, basis: SparsityBasis, options: RandomOptions) -> dict[str, Any]:
    return plan_layer_method(config, target, basis, options, name="random")


register(
    Method(
        name="random",
        kind="layer",
        description="Remove k decoder layers chosen at random (seeded baseline).",
        options_model=RandomOptions,
        run=run,
        plan=plan,
    )
)
