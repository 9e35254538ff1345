"""GradMAP (arXiv 2602.14649): iterative gradient-metric layer selection + projection compensation.

Stage 1: per decision, one forward+backward of the calibration batch on the current (already
pruned) model scores every remaining layer; the least important goes; repeat until k are gone.
Stage 2 (compensation, on by default) is shared with every layer method (`layer_common`).

The score variants are options; the default was chosen by measurement on SmolLM2-135M (see
docs/benchmarks/layer-pruning.md).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from workers.engine.hidden import lm_loss
from workers.engine.layers import layer_subset
from workers.engine.methods.gradient_scores import ResidualScore, WeightScore, gradient_scores
from workers.engine.methods.in_loop import InLoopCompensation
from workers.engine.methods.layer_common import (
    CompensatedOptions,
    Selection,
    SelectorInput,
    compensation_tokens,
    decision,
    one_shot_decisions,
    pick_lowest,
    register_layer_method,
)
from workers.engine.types import PruneContext

GradMAPScore = ResidualScore | WeightScore  # every score gradient_scores() knows


class GradMAPOptions(CompensatedOptions):
    """GradMAP options: the gradient score, iterative vs one-shot, plus the shared layer options."""

    score: GradMAPScore = Field(
        "kl_fisher",
        description=(
            "Layer importance from one backward pass. kl_fisher (default, see below); residual: "
            "mean_t |dL/dh_out . (h_out - h_in)|, the "
            "per-token magnitude of the first-order loss change of removing the layer; residual_signed: the signed "
            "estimate -sum_t dL/dh_out . (h_out - h_in); residual_sum_abs: |sum_t .|; "
            "residual_relative: |.| weighted by the relative size of the layer's update; residual_fisher: the "
            "second-order term 1/2 mean_t (N dL/dh_out . (h_out - h_in))^2 (empirical Fisher); kl_fisher: the same "
            "with labels sampled from the model, an estimate of the KL to the current model (measured best over "
            "both built-in models and all ratios, docs/benchmarks/layer-pruning.md); grad_delta_norm: "
            "sum_t ||dL/dh_out|| ||h_out - h_in||; grad_influence: mean_t 1 - cos(dL/dh_in, dL/dh_out); "
            "fwd_bwd_influence: that plus 1 - cos(h_in, h_out); grad_mean: mean |dL/dW|; taylor: mean |W * dL/dW|."
        ),
    )
    iterative: bool = Field(True, description="Re-score after every removal (one backward per decision).")
    compensate_in_loop: bool | None = Field(
        None,
        description=(
            "After every decision, fit the compensation for the layers removed so far before the next scoring, so "
            "later decisions see the corrected model (on the first in_loop_samples compensation windows; the final "
            "compensation is refitted from the original weights on the whole budget). Default (null): on exactly "
            "when compensation is on, since it picks the layers that compensation repairs best "
            "(docs/benchmarks/layer-pruning.md)."
        ),
    )
    lookahead: int = Field(
        0,
        ge=0,
        le=16,
        description=(
            "Iterative only: re-rank the N lowest-scored candidates of every decision by the exact calibration "
            "loss of the current model without each (N extra forwards per decision); 0 or 1: the score decides."
        ),
    )
    in_loop_samples: int = Field(
        32,
        ge=0,
        le=4096,
        description=(
            "Windows the in-loop projections are fitted on: the first N of the job's compensation windows (0, or "
            "no compensation data: the scoring calibration batch). Fewer than the final compensation's: they only "
            "steer the next decisions."
        ),
    )
    in_loop_judged: bool = Field(
        False,
        description=(
            "Judge every in-loop projection on held-out compensation windows and drop those that raise the loss, "
            "as the final compensation does. Off (default): every in-loop projection is kept, at about a third of "
            "the in-loop cost; on both built-in models it removes the same layers at every ratio measured "
            "(docs/benchmarks/layer-pruning.md)."
        ),
    )
    in_loop_refit: Literal["incremental", "full"] = Field(
        "incremental",
        description=(
            "incremental: after a cut, refit only the projections of the kept layers next to it and keep the "
            "others; full: refit every projection from the original weights after every decision."
        ),
    )

    def in_loop(self) -> bool:
        """Whether selection fits in-loop compensation (by default: when the job compensates)."""
        return self.compensation if self.compensate_in_loop is None else self.compensate_in_loop

    def selection_only(self) -> GradMAPOptions:
        """These options without the final compensation, choosing the same layers."""
        return self.model_copy(update={"compensation": False, "compensate_in_loop": self.in_loop()})


def in_loop_windows(ctx: PruneContext, options: GradMAPOptions) -> torch.Tensor:
    """What in-loop compensation fits on: the first `in_loop_samples` compensation windows, else the calibration."""
    if options.in_loop_samples == 0 or ctx.compensation_data is None:
        return ctx.calibration
    return compensation_tokens(ctx, options)[0][: options.in_loop_samples]


def lookahead_choice(
    model: nn.Module, keep: list[int], scores: dict[int, float], ids: torch.Tensor, n: int, micro_batch_size: int
) -> tuple[int, dict[int, float]]:
    """Among the n lowest-scored candidates, the one whose removal leaves the lowest loss on `ids`."""
    shortlist = sorted(scores, key=lambda i: (scores[i], i))[:n]
    losses = {}
    for layer in shortlist:
        with layer_subset(model, [i for i in keep if i != layer]):
            losses[layer] = lm_loss(model, ids, micro_batch_size)
    return min(shortlist, key=lambda i: (losses[i], i)), losses


def select(inp: SelectorInput) -> Selection:
    ctx = inp.ctx
    options: GradMAPOptions = ctx.options  # type: ignore[assignment]
    counter = {"backward_calls": 0, "lookahead_forwards": 0}

    def count() -> None:
        counter["backward_calls"] += 1

    def score(keep: list[int]) -> dict[int, float]:
        with layer_subset(ctx.model, keep):
            values = gradient_scores(
                ctx.model, ctx.calibration, options.score, options.micro_batch_size, ctx.check_cancel, count
            )
        allowed = set(inp.candidates)
        return {layer: values[pos] for pos, layer in enumerate(keep) if layer in allowed}

    in_loop_tokens, in_loop_seconds = 0, 0.0
    if not options.iterative:
        scores = score(list(range(inp.n_layers)))
        removed, decisions = one_shot_decisions(scores, inp.k)
        passes = 1
    else:
        removed = list(inp.prefix)
        decisions = []
        in_loop = None
        if options.in_loop():
            setup_started = time.perf_counter()
            ids = in_loop_windows(ctx, options)
            incremental = options.in_loop_refit == "incremental"
            in_loop = InLoopCompensation(
                ctx.model, ids, options.compensation_config(), incremental, ctx.check_cancel, options.in_loop_judged
            )
            in_loop_tokens = int(ids.numel())
        try:
            if in_loop is not None:  # a resumed run first rebuilds the projections its prefix had
                for n in range(1, len(inp.prefix) + 1):
                    in_loop.after_cut(list(inp.prefix[:n]), inp.prefix[n - 1])
                # The original targets (captured once) and any prefix refits.
                in_loop_seconds = time.perf_counter() - setup_started
            for step in range(len(inp.prefix), inp.k):
                started = time.perf_counter()
                ctx.check_cancel()
                inp.progress(step / inp.k, f"decision {step + 1}/{inp.k}: scoring with one backward pass")
                keep = [i for i in range(inp.n_layers) if i not in set(removed)]
                scores = {layer: s for layer, s in score(keep).items() if layer not in set(removed)}
                chosen = pick_lowest(scores)
                extra: dict[str, object] = {}
                if options.lookahead > 1:
                    ctx.check_cancel()
                    chosen, losses = lookahead_choice(
                        ctx.model, keep, scores, ctx.calibration, options.lookahead, options.micro_batch_size
                    )
                    counter["lookahead_forwards"] += len(losses)
                    extra["lookahead_losses"] = {str(layer): loss for layer, loss in sorted(losses.items())}
                removed.append(chosen)
                # The last decision's fit only serves a hook (a search predicting from this state).
                if in_loop is not None and (step + 1 < inp.k or ctx.after_decision is not None):
                    extra.update(in_loop.after_cut(removed, chosen))
                    in_loop_seconds += float(extra["in_loop_compensation_seconds"])  # type: ignore[arg-type]
                seconds = round(time.perf_counter() - started, 4)
                decisions.append(decision(step, scores, chosen, seconds=seconds, **extra))
                if ctx.after_decision is not None:
                    with layer_subset(ctx.model, [i for i in keep if i != chosen]):
                        ctx.after_decision(list(removed), ctx.model)
        finally:
            if in_loop is not None:
                in_loop.restore()
        passes = inp.k - len(inp.prefix)
    return Selection(
        removed=sorted(removed),
        decisions=decisions,
        forward_passes=passes + counter["lookahead_forwards"],
        backward_passes=passes,
        extra={
            "score": options.score,
            "backward_calls": counter["backward_calls"],
            "removal_order": removed,
            "lookahead_forwards": counter["lookahead_forwards"],
            "in_loop_tokens": in_loop_tokens,
            # Setup plus every refit: what in-loop compensation added to the scoring time.
            "in_loop_seconds": round(in_loop_seconds, 3),
        },
    )


register_layer_method(
    "gradmap",
    (
        "GradMAP: iterative gradient-metric layer removal (one backward pass per decision) with projection "
        "compensation merged into the weights."
    ),
    GradMAPOptions,
    select,
    # In-loop projections of earlier cuts shape later scores: a resumed run refits them first.
    resumable=lambda options: options.iterative,
    # After each decision the selection holds the pruned model with its in-loop projections: close to
    # what the final compensation gives, so a quality search predicts each size's quality from it.
    predicts=lambda options: options.iterative and options.compensation and options.in_loop(),
)
