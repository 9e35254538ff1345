"""SLEB-style baseline (Song et al., 2024): greedy removal by calibration loss.

Per decision, every remaining candidate is tried: the model without it is run on the calibration
data (forward only) and the layer whose removal gives the lowest loss goes. Costs
sum_d (remaining candidates) forward passes, which is what GradMAP's single backward replaces.
"""

from __future__ import annotations

import time

from pydantic import Field

from workers.engine.hidden import lm_loss
from workers.engine.layers import layer_subset
from workers.engine.methods.layer_common import (
    LayerMethodOptions,
    Selection,
    SelectorInput,
    decision,
    pick_lowest,
    register_layer_method,
)


class SLEBOptions(LayerMethodOptions):
    scoring_samples: int | None = Field(
        None, ge=1, description="Use only the first N calibration samples to score candidates (bounds the cost)."
    )


def select(inp: SelectorInput) -> Selection:
    ctx = inp.ctx
    options: SLEBOptions = ctx.options  # type: ignore[assignment]
    ids = ctx.calibration if options.scoring_samples is None else ctx.calibration[: options.scoring_samples]
    removed: list[int] = list(inp.prefix)
    decisions = []
    forwards = 0
    total = sum(len(inp.candidates) - step for step in range(len(removed), inp.k))
    for step in range(len(removed), inp.k):
        started = time.perf_counter()
        scores: dict[int, float] = {}
        for layer in inp.candidates:
            if layer in removed:
                continue
            ctx.check_cancel()
            inp.progress(forwards / total, f"decision {step + 1}/{inp.k}: trying without layer {layer}")
            keep = [i for i in range(inp.n_layers) if i not in set(removed) | {layer}]
            with layer_subset(ctx.model, keep):
                scores[layer] = lm_loss(ctx.model, ids, options.micro_batch_size)
            forwards += 1
        chosen = pick_lowest(scores)
        decisions.append(decision(step, scores, chosen, seconds=round(time.perf_counter() - started, 4)))
        removed.append(chosen)
    return Selection(
        removed=sorted(removed),
        decisions=decisions,
        forward_passes=forwards,
        extra={"score": "calibration_loss_without_layer", "removal_order": removed},
    )


register_layer_method(
    "sleb",
    "SLEB-style greedy: per decision try removing each layer, drop the one with the lowest loss.",
    SLEBOptions,
    select,
    resumable=lambda options: True,  # each decision depends only on the layers removed before it
)
