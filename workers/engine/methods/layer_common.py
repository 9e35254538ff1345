"""What every layer-pruning method shares: options, the run skeleton, the report and the plan.

A layer method only implements a *selector*: given the model and calibration data it returns which
layers (original indices) to drop and the per-decision scores. Everything else -- the sparsity
budget, drift measurement, optional projection compensation, the actual removal and the report --
is done here identically for every selector, so methods are compared on equal terms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from transformers import PretrainedConfig

from workers.engine.compensation import CompensationConfig, Placement, compensate, measure_shift
from workers.engine.layer_budget import (
    LayerProfile,
    achieved_sparsity,
    estimated_removal,
    parameters_after,
    profile_config,
    profile_model,
    resolve_k,
)
from workers.engine.layers import find_layers, remove_layers
from workers.engine.types import EngineError, MethodOptions, PruneContext, PruneOutcome, SparsityBasis

# Default compensation budgets (token windows of the calibration length), chosen by measurement
# (docs/benchmarks/layer-pruning.md, "Compensation tokens"). Windows drawn from a dataset cost
# nothing to get, so they take the budget that fitted best; self-generated windows cost generation
# time (the first job's critical path), so they keep the smaller one.
COMPENSATION_SAMPLES = 128
SELF_GENERATED_COMPENSATION_SAMPLES = 32


def compensation_budget(source: str) -> int:
    """Default `compensation_samples` for calibration from `source` ("dataset" or "self_generated")."""
    return SELF_GENERATED_COMPENSATION_SAMPLES if source == "self_generated" else COMPENSATION_SAMPLES


def with_compensation_budget(options: MethodOptions, given: dict | None, source: str) -> MethodOptions:
    """`options` with the source's default compensation budget, unless the user set one."""
    if "compensation_samples" not in type(options).model_fields or "compensation_samples" in (given or {}):
        return options
    return options.model_copy(update={"compensation_samples": compensation_budget(source)})


class LayerMethodOptions(MethodOptions):
    """Options common to all layer selectors (compensation can follow any of them)."""

    compensation: bool = Field(False, description="Fit and merge a projection that corrects the hidden-state drift.")
    micro_batch_size: int = Field(4, ge=1, le=1024, description="Calibration samples per forward/backward.")
    compensation_placement: Placement = Field(
        "around_cut",
        description=(
            "Which kept layer receives a projection per removed block: around_cut (default: the previous and the "
            "next kept layer, each kept only if it helps), after_cut (the next one), before_cut (the previous one), "
            "or the layers of largest shift."
        ),
    )
    compensation_max_projections: int = Field(
        8, ge=1, le=64, description="At most this many projections (one per removed block), each kept only if it helps."
    )
    compensation_ridge: float = Field(1.0, ge=0.0, le=1e3, description="Ridge strength relative to trace(X^T X)/d.")
    compensation_refine_steps: int = Field(0, ge=0, le=1000, description="Adam refinement steps after the solve.")
    compensation_refine_lr: float = Field(1e-4, gt=0.0, le=1.0)
    compensation_heldout_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="Calibration share for validation.")
    compensation_max_heldout_samples: int = Field(
        8,
        ge=1,
        le=4096,
        description=(
            "At most this many of the compensation windows judge each projection (the rest fit it; a kept one is "
            "then refitted on all): judging is most of compensation's cost, so larger budgets stay cheap."
        ),
    )
    compensation_samples: int = Field(
        COMPENSATION_SAMPLES,
        ge=1,
        le=4096,
        description=(
            "Token windows used to fit the compensation: its own budget, larger than the scoring calibration, "
            "drawn from the same source (the first N windows of the job's compensation data; without it the "
            "calibration batch is used). Their normal equations are streamed, so memory does not grow with N."
        ),
    )
    compensation_max_tokens: int = Field(
        16384, ge=16, description="Token rows kept in memory for the Adam refinement (the closed-form fit streams all)."
    )
    compensation_refit_all: bool = Field(
        True, description="Refit a projection that passed the held-out check on all calibration tokens."
    )
    protect_first: int = Field(0, ge=0, le=64, description="Never remove the first N layers.")
    protect_last: int = Field(0, ge=0, le=64, description="Never remove the last N layers.")

    def selection_only(self) -> LayerMethodOptions:
        """These options without the final compensation, choosing the same layers (a quality search
        builds its removal order once and compensates each probe itself)."""
        return self.model_copy(update={"compensation": False})

    def protection(self, n_layers: int, k: int) -> tuple[int, int]:
        """(first, last) layers that may not be removed."""
        return self.protect_first, self.protect_last

    def compensation_config(self) -> CompensationConfig:
        return CompensationConfig(
            placement=self.compensation_placement,
            max_projections=self.compensation_max_projections,
            ridge=self.compensation_ridge,
            refine_steps=self.compensation_refine_steps,
            refine_lr=self.compensation_refine_lr,
            heldout_fraction=self.compensation_heldout_fraction,
            max_heldout_samples=self.compensation_max_heldout_samples,
            max_tokens=self.compensation_max_tokens,
            refit_on_all=self.compensation_refit_all,
            micro_batch_size=self.micro_batch_size,
        )


class CompensatedOptions(LayerMethodOptions):
    """Options of methods that compensate by default (GradMAP)."""

    compensation: bool = Field(True, description="Fit and merge a projection that corrects the hidden-state drift.")


@dataclass
class Selection:
    """A selector's answer: removed layers (original indices) and how it decided."""

    removed: list[int]
    decisions: list[dict[str, Any]] = field(default_factory=list)
    forward_passes: int = 0
    backward_passes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelectorInput:
    ctx: PruneContext
    k: int
    n_layers: int
    candidates: list[int]  # original indices the selector may remove (protected ones excluded)
    prefix: list[int] = field(default_factory=list)  # already removed, in order (resumable selectors)

    def progress(self, fraction: float, message: str | None = None) -> None:
        self.ctx.progress("scoring", min(max(fraction, 0.0), 1.0), message)


Selector = Callable[[SelectorInput], Selection]


def candidate_layers(n_layers: int, k: int, options: LayerMethodOptions) -> list[int]:
    first, last = options.protection(n_layers, k)
    return list(range(first, n_layers - last))


def check_candidates(n_layers: int, k: int, options: LayerMethodOptions) -> list[int]:
    candidates = candidate_layers(n_layers, k, options)
    if len(candidates) < k:
        first, last = options.protection(n_layers, k)
        raise EngineError(
            "invalid_sparsity",
            f"Removing {k} of {n_layers} layers is impossible with protect_first={first} and "
            f"protect_last={last} ({len(candidates)} layers may be removed).",
        )
    return candidates


def decision(step: int, scores: dict[int, float], chosen: int, **extra: Any) -> dict[str, Any]:
    """One pruning decision: every candidate's score (original indices, as string keys) and the choice."""
    return {
        "step": step,
        "scores": {str(layer): float(score) for layer, score in sorted(scores.items())},
        "chosen": int(chosen),
        **extra,
    }


def one_shot_decisions(scores: dict[int, float], k: int, lowest_first: bool = True) -> tuple[list[int], list[dict]]:
    """Remove the k lowest-scored layers of a single scoring, recorded as k decisions."""
    remaining = dict(scores)
    removed: list[int] = []
    decisions = []
    for step in range(k):
        chosen = min(remaining, key=lambda i: (remaining[i], i)) if lowest_first else max(remaining, key=remaining.get)
        decisions.append(decision(step, remaining, chosen))
        removed.append(chosen)
        del remaining[chosen]
    return sorted(removed), decisions


def compensation_tokens(ctx: PruneContext, options: LayerMethodOptions) -> tuple[torch.Tensor, str]:
    """The token windows compensation fits on, and where they came from (for the report)."""
    data = ctx.compensation_data
    if data is None:
        return ctx.calibration, "calibration"
    if data.ndim != 2 or data.shape[0] < 1 or data.shape[1] < 2:
        raise EngineError(
            "invalid_calibration", "Compensation data must be token ids of shape [n_samples, seq_len>=2]."
        )
    return data[: options.compensation_samples], "compensation_data"


def run_layer_method(ctx: PruneContext, selector: Selector, name: str) -> PruneOutcome:
    """Select -> measure drift -> (compensate) -> remove, and build the common report."""
    options = ctx.options
    assert isinstance(options, LayerMethodOptions)
    model = ctx.model
    timings: dict[str, float] = {}
    profile = profile_model(model)
    n_layers = profile.n_layers
    k = resolve_k(profile, ctx.target_sparsity, ctx.sparsity_basis)
    candidates = check_candidates(n_layers, k, options)
    calibration = ctx.calibration
    if calibration.ndim != 2 or calibration.shape[0] < 1 or calibration.shape[1] < 2:
        raise EngineError("invalid_calibration", "Calibration must be token ids of shape [n_samples, seq_len>=2].")

    ctx.check_cancel()
    ctx.progress("scoring", 0.0, f"{name}: choosing {k} of {n_layers} layers")
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    prefix = list(ctx.resume_from or [])
    selection = selector(SelectorInput(ctx=ctx, k=k, n_layers=n_layers, candidates=candidates, prefix=prefix))
    timings["scoring"] = time.perf_counter() - started
    if prefix and selection.extra.get("removal_order", [])[: len(prefix)] != prefix:
        raise RuntimeError(f"{name} cannot resume from a removal order")
    removed = sorted(selection.removed)
    if len(removed) != k or len(set(removed)) != k:
        raise RuntimeError(f"{name} selected {removed}, expected {k} distinct layers")
    keep = [i for i in range(n_layers) if i not in set(removed)]
    ctx.progress("scoring", 1.0, f"{name}: remove layers {removed}")
    ctx.check_cancel()

    # Drift of the pruned model against the original, before any compensation.
    started = time.perf_counter()
    ctx.progress("pruning", 0.0, "measuring hidden-state drift")
    shifts = measure_shift(model, keep, calibration, options.micro_batch_size, ctx.check_cancel)
    timings["analysis"] = time.perf_counter() - started

    compensation_report: dict[str, Any] = {"enabled": False}
    if options.compensation:
        comp_ids, source = compensation_tokens(ctx, options)
        started = time.perf_counter()
        ctx.progress("compensating", 0.0, "fitting projection compensation")
        compensation_report = compensate(
            model,
            keep,
            comp_ids,
            options.compensation_config(),
            shifts=shifts,
            progress=lambda f, m: ctx.progress("compensating", f, m),
            check_cancel=ctx.check_cancel,
        )
        compensation_report["source"] = source
        timings["compensating"] = time.perf_counter() - started
        ctx.progress("compensating", 1.0, "kept" if compensation_report.get("kept") else "rejected")
        ctx.check_cancel()

    started = time.perf_counter()
    ctx.progress("pruning", 0.5, f"removing layers {removed}")
    remove_layers(model, removed)
    model.train(was_training)
    timings["pruning"] = time.perf_counter() - started
    ctx.progress("pruning", 1.0, None)

    achieved = achieved_sparsity(profile, removed)
    report = {
        "kind": "layer",
        "selector": name,
        "k": k,
        "removed_layers": removed,
        "kept_layers": keep,
        "layers_before": n_layers,
        "layers_after": len(find_layers(model).layers),
        "achieved_layer_sparsity": achieved["layers"],
        "achieved_sparsity": achieved,
        "decisions": selection.decisions,
        "mean_shift": shifts,
        "compensation": compensation_report,
        "timings": {stage: round(seconds, 4) for stage, seconds in timings.items()},
        "forward_passes": selection.forward_passes,
        "backward_passes": selection.backward_passes,
        **selection.extra,
    }
    return PruneOutcome(model=model, report=report)


def plan_layer_method(
    config: PretrainedConfig,
    target_sparsity: float,
    basis: SparsityBasis,
    options: LayerMethodOptions,
    *,
    name: str,
    deterministic: Callable[[int, int, LayerMethodOptions], list[int]] | None = None,
) -> dict[str, Any]:
    """Dry run: k, layers and parameters before/after; which layers only when data-independent."""
    profile: LayerProfile = profile_config(config)
    n_layers = profile.n_layers
    k = resolve_k(profile, target_sparsity, basis)
    check_candidates(n_layers, k, options)
    removed = deterministic(n_layers, k, options) if deterministic else None
    assumed = removed if removed is not None else estimated_removal(profile, k)
    achieved = achieved_sparsity(profile, assumed)
    return {
        "method": name,
        "kind": "layer",
        "k": k,
        "layers_before": n_layers,
        "layers_after": n_layers - k,
        "removed_layers": removed,
        "selection": "deterministic" if removed is not None else "data-dependent (known after scoring)",
        "parameters_before": {"total": profile.total, "without_embeddings": profile.without_embeddings},
        "parameters_after": parameters_after(profile, assumed),
        "achieved_layer_sparsity": achieved["layers"],
        "achieved_sparsity": achieved,
        "compensation": bool(options.compensation),
    }


def pick_lowest(scores: dict[int, float]) -> int:
    return min(scores, key=lambda i: (scores[i], i))


def register_layer_method(
    name: str,
    description: str,
    options_model: type[LayerMethodOptions],
    select: Selector,
    deterministic: Callable[..., list[int]] | None = None,
    resumable: Callable[[Any], bool] | None = None,
    predicts: Callable[[Any], bool] | None = None,
) -> None:
    """Register a layer method: all layer methods share the run skeleton and the plan."""
    from workers.engine.registry import Method, register

    def run(ctx: PruneContext) -> PruneOutcome:
        return run_layer_method(ctx, select, name)

    def plan(
        config: PretrainedConfig, target: float, basis: SparsityBasis, options: LayerMethodOptions
    ) -> dict[str, Any]:
        extra = {"deterministic": deterministic} if deterministic is not None else {}
        return plan_layer_method(config, target, basis, options, name=name, **extra)

    register(
        Method(
            name=name,
            kind="layer",
            description=description,
            options_model=options_model,
            run=run,
            plan=plan,
            resumable=resumable,
            predicts=predicts,
        )
    )
