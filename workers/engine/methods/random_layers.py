"""Baseline: remove k layers chosen uniformly at random (seeded by the job's seed)."""

from __future__ import annotations

import torch

from workers.engine.methods.layer_common import (
    LayerMethodOptions,
    Selection,
    SelectorInput,
    one_shot_decisions,
    register_layer_method,
)


class RandomOptions(LayerMethodOptions):
    """Only the shared options; the draw depends on the job's `seed`."""


def select(inp: SelectorInput) -> Selection:
    generator = torch.Generator().manual_seed(inp.ctx.seed)
    draws = torch.rand(len(inp.candidates), generator=generator).tolist()
    scores = dict(zip(inp.candidates, draws, strict=True))
    removed, decisions = one_shot_decisions(scores, inp.k)
    return Selection(removed=removed, decisions=decisions, extra={"score": "uniform_random", "seed": inp.ctx.seed})


register_layer_method(
    "random",
    "Remove k decoder layers chosen at random (seeded baseline).",
    RandomOptions,
    select,
)
