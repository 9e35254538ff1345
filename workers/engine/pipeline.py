"""The engine's entry point: validate a request, run a method, and add the common report fields."""

from __future__ import annotations

import copy
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from workers.engine.layer_budget import profile_model, resolve_k
from workers.engine.params import count_parameters
from workers.engine.recovery import Alignment, RecoveryConfig, parse_recovery, recover, recovery_tokens, tokens_sha256
from workers.engine.registry import get_method, parse_options
from workers.engine.resources import PeakMemory
from workers.engine.search import ProbeResult, QualityTarget, largest_passing, no_candidate_error
from workers.engine.search.curve import largest_passing_from, scaled_prediction_miss
from workers.engine.search.layers import fixed_removal, removal_order
from workers.engine.search.measure import Measure, PerplexityMeasure
from workers.engine.types import (
    CancelCheck,
    EngineError,
    MethodOptions,
    ProgressFn,
    PruneContext,
    PruneOutcome,
    SelectionStopped,
    SparsityBasis,
    never_cancel,
    no_progress,
)


def validate_target(target_sparsity: float, basis: str) -> None:
    if basis not in ("layers", "parameters"):
        raise EngineError("invalid_sparsity", f"sparsity_basis must be 'layers' or 'parameters', not {basis!r}.")
    if not 0.0 < target_sparsity < 1.0:
        raise EngineError(
            "invalid_sparsity", f"target_sparsity must be strictly between 0 and 1, got {target_sparsity}."
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prune(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    *,
    method: str,
    target_sparsity: float,
    sparsity_basis: SparsityBasis = "layers",
    options: dict[str, Any] | MethodOptions | None = None,
    progress: ProgressFn = no_progress,
    should_cancel: CancelCheck = never_cancel,
    seed: int = 0,
    tokenizer: Any = None,
    recovery_data: torch.Tensor | None = None,
    compensation_data: torch.Tensor | None = None,
    recovery: RecoveryConfig | dict[str, Any] | str | None = None,
    recovery_texts: list[str] | None = None,
    after_pruning: Callable[[PruneOutcome], None] | None = None,
) -> PruneOutcome:
    """Prune `model` (in place) with a registered method and return it with its report.

    With `recovery`, the pruned (and compensated) model is then healed (`recovering` stage);
    `recovery_texts` is the dataset for data=dataset/mix. `after_pruning(outcome)` runs between
    pruning and recovery (the service evaluates the unrecovered model there).
    """
    validate_target(target_sparsity, sparsity_basis)
    spec = get_method(method)
    opts = options if isinstance(options, MethodOptions) else parse_options(spec, options)
    seed_everything(seed)
    setup = prepare_recovery(
        model,
        tokenizer,
        parse_recovery(recovery),
        recovery_texts,
        seed=seed,
        progress=progress,
        should_cancel=should_cancel,
    )
    outcome = run_method(
        spec.run,
        model,
        calibration,
        method=method,
        target_sparsity=target_sparsity,
        sparsity_basis=sparsity_basis,
        options=opts,
        progress=progress,
        should_cancel=should_cancel,
        seed=seed,
        tokenizer=tokenizer,
        recovery_data=recovery_data,
        compensation_data=compensation_data,
    )
    if after_pruning is not None:
        after_pruning(outcome)
    if setup is not None:
        apply_recovery(outcome, setup, progress=progress, should_cancel=should_cancel, seed=seed)
    return outcome


def run_method(
    run: Callable[[PruneContext], PruneOutcome],
    model: torch.nn.Module,
    calibration: torch.Tensor,
    *,
    method: str,
    target_sparsity: float,
    sparsity_basis: SparsityBasis,
    options: MethodOptions,
    progress: ProgressFn = no_progress,
    should_cancel: CancelCheck = never_cancel,
    seed: int = 0,
    tokenizer: Any = None,
    recovery_data: torch.Tensor | None = None,
    compensation_data: torch.Tensor | None = None,
    resume_from: list[int] | None = None,
    after_decision: Callable[[list[int], torch.nn.Module], None] | None = None,
) -> PruneOutcome:
    """Run one method body on `model` and add the common report fields (parameters, time, memory)."""
    before = count_parameters(model)
    ctx = PruneContext(
        model=model,
        calibration=calibration,
        target_sparsity=target_sparsity,
        sparsity_basis=sparsity_basis,
        options=options,
        progress=progress,
        should_cancel=should_cancel,
        seed=seed,
        tokenizer=tokenizer,
        recovery_data=recovery_data,
        compensation_data=compensation_data,
        resume_from=resume_from,
        after_decision=after_decision,
    )
    started = time.perf_counter()
    with PeakMemory() as memory:
        outcome = run(ctx)
    after = count_parameters(outcome.model)
    report = {
        "method": method,
        "options": options.model_dump(mode="json"),
        "target_sparsity": target_sparsity,
        "sparsity_basis": sparsity_basis,
        "seed": seed,
        "calibration_shape": list(calibration.shape),
        "parameters_before": before,
        "parameters_after": after,
        "achieved_parameter_sparsity": 1.0 - after["total"] / before["total"],
        **outcome.report,
        "pruning_seconds": round(time.perf_counter() - started, 3),
        "peak_memory": memory.summary(),
        "versions": versions(),
    }
    outcome.report = report
    return outcome


@dataclass
class RecoverySetup:
    """What recovery needs from the dense model, taken before pruning changes it."""

    config: RecoveryConfig
    tokens: torch.Tensor
    teacher: torch.nn.Module | None


def prepare_recovery(
    model: torch.nn.Module,
    tokenizer: Any,
    config: RecoveryConfig | None,
    texts: list[str] | None,
    *,
    seed: int = 0,
    progress: ProgressFn = no_progress,
    should_cancel: CancelCheck = never_cancel,
) -> RecoverySetup | None:
    """Sample/tokenise the training data and keep a frozen copy of the dense model as teacher."""
    if config is None:
        return None
    if tokenizer is None and config.data != "dataset":
        raise EngineError("invalid_recovery", "Self-generated recovery data needs the model's tokenizer.")
    progress("calibrating", 0.0, f"preparing {config.n_samples}x{config.seq_len} {config.data} recovery tokens")
    tokens = recovery_tokens(config, model, tokenizer, texts, seed=seed, progress=progress, should_cancel=should_cancel)
    teacher = None
    if config.method == "distill":
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    return RecoverySetup(config=config, tokens=tokens, teacher=teacher)


def apply_recovery(
    outcome: PruneOutcome,
    setup: RecoverySetup,
    *,
    progress: ProgressFn = no_progress,
    should_cancel: CancelCheck = never_cancel,
    seed: int = 0,
) -> None:
    """Heal `outcome.model` in place of the outcome; the report gains `recovery` (with its data fingerprint)."""
    report = outcome.report
    alignment = Alignment(kept_layers=report.get("kept_layers"), removed_layers=report.get("removed_layers"))
    progress("recovering", 0.0, f"{setup.config.method} ({setup.config.train}), {setup.config.planned_steps} steps")
    outcome.model, summary = recover(
        outcome.model,
        setup.teacher,
        setup.tokens,
        setup.config,
        alignment=alignment,
        progress=progress,
        should_cancel=should_cancel,
        seed=seed,
    )
    if "recovery" in report:  # the method's own recovery option (LLM-Pruner) keeps its record
        report["method_recovery"] = report.pop("recovery")
    report["recovery"] = {
        **summary,
        "data_shape": list(setup.tokens.shape),
        "data_tokens_sha256": tokens_sha256(setup.tokens),
    }
    progress("recovering", 1.0, None)


def search(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    *,
    method: str,
    target: QualityTarget | dict[str, Any],
    measure: Measure,
    sparsity_basis: SparsityBasis = "layers",
    options: dict[str, Any] | MethodOptions | None = None,
    progress: ProgressFn = no_progress,
    should_cancel: CancelCheck = never_cancel,
    seed: int = 0,
    tokenizer: Any = None,
    recovery: RecoveryConfig | dict[str, Any] | str | None = None,
    recovery_texts: list[str] | None = None,
    compensation_data: torch.Tensor | None = None,
) -> PruneOutcome:
    """The most-pruned model whose quality (`measure`, on held-out text) stays within `target`.

    Layer methods: one selector run at the largest size gives the removal order; each probe
    removes a prefix of it, compensates (as the options say) and recovers (when asked). Width
    methods: each probe prunes afresh at a parameter sparsity of the grid. `model` stays dense.
    Every published answer is a probe's: predictions only choose where probing starts, so the
    answer is the one a galloping search over probes gives whenever quality worsens with size.
    """
    target = target if isinstance(target, QualityTarget) else QualityTarget.model_validate(target)
    spec = get_method(method)
    opts = options if isinstance(options, MethodOptions) else parse_options(spec, options)
    seed_everything(seed)
    started = time.perf_counter()
    setup = prepare_recovery(
        model,
        tokenizer,
        parse_recovery(recovery),
        recovery_texts,
        seed=seed,
        progress=progress,
        should_cancel=should_cancel,
    )
    progress("evaluating", 0.0, "measuring the dense model")
    # A perplexity budget is tested per probe against the dense model's own segments (paired,
    # sequential: probes far from the budget stop early); other measures score every probe fully.
    dense_scored = None
    if isinstance(measure, PerplexityMeasure) and target.max_perplexity_ratio is not None:
        dense_scored = measure.dense(model)
    dense_value = float(dense_scored["ppl"]) if dense_scored is not None else measure(model)
    common = {"progress": progress, "should_cancel": should_cancel, "seed": seed, "tokenizer": tokenizer}

    def rate(model: torch.nn.Module) -> tuple[float, dict[str, Any]]:
        """The budget metric of a pruned model and what the report keeps of its measurement."""
        extra: dict[str, Any] = {}
        if dense_scored is not None:
            assert isinstance(measure, PerplexityMeasure) and target.max_perplexity_ratio is not None
            scored = measure.ratio_against(model, dense_scored, target.max_perplexity_ratio)
            raw, value = scored.perplexity, scored.ratio
            extra = {"stderr": round(scored.stderr, 5), "segments": scored.segments, "complete": scored.complete}
        else:
            raw = measure(model)
            value = raw / dense_value if target.max_perplexity_ratio is not None else raw
        return value, {**extra, "metric_raw": round(raw, 5)}

    def score(outcome: PruneOutcome) -> tuple[float, dict[str, Any]]:
        value, extra = rate(outcome.model)
        compensation = outcome.report.get("compensation") or {}
        tokens = compensation.get("compensation_tokens") if compensation.get("enabled") else None
        return value, {**extra, "compensation_tokens": tokens}

    order: list[int] | None = None
    resumable = predicting = False
    # Sizes predicted from the selection's own in-loop state (methods that can): where to start probing.
    predictions: list[ProbeResult] = []
    # Probes may compensate on a slice of the job's windows (cheap); the chosen size is refitted on all.
    probe_data = compensation_data

    def run_on_copy(
        run: Callable[[PruneContext], PruneOutcome],
        sparsity: float,
        basis: SparsityBasis,
        options: MethodOptions,
        **extra: Any,
    ) -> PruneOutcome:
        return run_method(
            run,
            copy.deepcopy(model),
            calibration,
            method=method,
            target_sparsity=sparsity,
            sparsity_basis=basis,
            options=options,
            **common,
            **extra,
        )

    if spec.kind == "layer":
        profile = profile_model(model)
        n_layers = profile.n_layers
        k_max = resolve_k(profile, target.max_sparsity, "layers")
        # The order needs no compensation: each probe compensates its own prefix.
        unfitted = opts.selection_only()  # type: ignore[attr-defined]  # every layer method's options have it
        # An iterative selector that can resume is only run as far as the probes need: the search
        # then gallops up from one layer (1, 2, 4, ...) so the order stays within ~2x the answer, or,
        # where the selection can predict each size from its in-loop state, up to the first size
        # predicted to miss; probing starts there and gallops away from it.
        resumable = spec.resumable is not None and spec.resumable(unfitted) and not target.full_curve
        # Predictions steer a perplexity budget without recovery (they cannot see what recovery heals).
        predicting = (
            resumable
            and target.predict
            and spec.predicts is not None
            and spec.predicts(opts)
            and dense_scored is not None
            and setup is None
        )
        order = []

        def select(k: int, **extra: Any) -> PruneOutcome:
            """A selection-only run to k layers; the compensation windows too, since in-loop
            compensation fits on them as in a single job."""
            return run_on_copy(spec.run, k / n_layers, "layers", unfitted, compensation_data=compensation_data, **extra)

        def grow_order(k: int) -> None:
            """Extend the removal order to k layers (resumable selectors continue where they stopped)."""
            nonlocal order
            if len(order or []) >= k:
                return
            resume = {"resume_from": order} if resumable else {}
            order = removal_order(select(k, **resume).report)

        def predict_order() -> None:
            """Run the selection up to the first size whose in-loop state misses the budget, measuring each."""

            def predict(removed: list[int], pruned: torch.nn.Module) -> None:
                nonlocal order
                order = list(removed)
                progress("scoring", 0.0, f"predicting size {len(removed)} from the selection's in-loop state")
                measured = time.perf_counter()
                value, extra = rate(pruned)
                extra["seconds"] = round(time.perf_counter() - measured, 3)
                predictions.append(ProbeResult(size=len(removed), value=value, meets=target.meets(value), extra=extra))
                if not predictions[-1].meets:
                    raise SelectionStopped

            try:
                select(k_max, after_decision=predict)
            except SelectionStopped:
                pass

        if not resumable:
            grow_order(k_max)
        elif predicting:
            predict_order()
        candidates: list[float] = list(range(1, k_max + 1))
        n_probe = target.probe_compensation_samples
        if getattr(opts, "compensation", False) and setup is None and compensation_data is not None:
            windows = min(len(compensation_data), opts.compensation_samples)  # type: ignore[attr-defined]
            if 0 < n_probe < windows:
                probe_data = compensation_data[:n_probe]

        def build(size: float, data: torch.Tensor | None = None) -> PruneOutcome:
            grow_order(int(size))
            # Each probe compensates like a single job would, on (the first of) its compensation windows.
            return run_on_copy(
                fixed_removal(order or [], method),
                size / n_layers,
                "layers",
                opts,
                compensation_data=probe_data if data is None else data,
            )
    else:
        steps = int(target.max_sparsity / target.sparsity_step + 1e-9)
        candidates = [round(target.sparsity_step * i, 6) for i in range(1, steps + 1)]

        def build(size: float, data: torch.Tensor | None = None) -> PruneOutcome:
            return run_on_copy(spec.run, size, "parameters", opts)

    best: dict[str, PruneOutcome] = {}
    exact: dict[float, ProbeResult] = {}
    # Without confirm_next, a prediction that the exact probe below agreed with decides a miss on its own.
    trusting = predicting and not target.confirm_next

    def probe(size: float) -> ProbeResult:
        trusted = scaled_prediction_miss(size, exact, predictions, target.meets) if trusting else None
        if trusted is not None:
            progress("scoring", 0.0, f"size {size:g} misses by its scaled prediction: {trusted.value:.4g}")
            return trusted
        probe_started = time.perf_counter()
        outcome = build(size)
        if setup is not None:
            apply_recovery(outcome, setup, progress=progress, should_cancel=should_cancel, seed=seed)
        value, extra = score(outcome)
        result = ProbeResult(
            size=size,
            value=value,
            meets=target.meets(value),
            extra={
                **extra,
                "parameters_after": outcome.report["parameters_after"]["total"],
                "achieved_parameter_sparsity": round(outcome.report["achieved_parameter_sparsity"], 5),
                "seconds": round(time.perf_counter() - probe_started, 3),
                "exact": True,
            },
        )
        exact[size] = result
        progress("scoring", 0.0, f"probe size {size:g}: {target.metric} {value:.4g}")
        if result.meets and ("chosen" not in best or size > best["chosen"].report["search_size"]):
            outcome.report["search_size"] = size
            best["chosen"] = outcome
        return result

    if predicting:
        # Start at the predicted answer (its size is position + 1), or just past it with confirm_next:
        # then it and the size below usually decide.
        predicted = max((int(p.size) for p in predictions if p.meets), default=0)
        start = predicted if target.confirm_next else max(predicted - 1, 0)
        found = largest_passing_from(candidates, min(start, len(candidates) - 1), probe)
    else:
        found = largest_passing(candidates, probe, full=target.full_curve, gallop=resumable)
    if found.chosen is None:
        raise no_candidate_error(target.budget(), found.curve, target.metric)
    outcome = best["chosen"]
    outcome.report.pop("search_size")
    chosen_value = found.chosen.value
    refit: dict[str, Any] | None = None
    if probe_data is not compensation_data:
        # The probes fitted on a slice: the published model is what a single job at this size gives
        # (all windows), as long as it still meets the budget; otherwise the probe's model, which does.
        refit_started = time.perf_counter()
        progress("compensating", 0.0, f"refitting size {found.chosen.size:g} on every compensation window")
        refitted = build(found.chosen.size, compensation_data)
        value, extra = score(refitted)
        published = target.meets(value)
        refit = {"value": round(value, 5), "meets": published, "published": published, **extra}
        refit["seconds"] = round(time.perf_counter() - refit_started, 3)
        if published:
            outcome, chosen_value = refitted, value
    outcome.report["quality_target"] = {
        **target.model_dump(mode="json"),
        "metric": target.metric,
        "dense_value": round(dense_value, 5),
        "dense_cached": bool(dense_scored is not None and dense_scored.get("cached")),
        "chosen_size": found.chosen.size,
        "chosen_value": round(chosen_value, 5),
        "probe_value": round(found.chosen.value, 5),
        "refit": refit,
        # Exact probes, and (`exact: false`) sizes whose scaled prediction decided a miss.
        "curve": [p.to_json() for p in found.curve],
        # Quality of the selection's in-loop state at each size (not a published model): where probing started.
        "predictions": [p.to_json() for p in predictions],
        "probes": len(exact),
        "removal_order": order,
        "search_seconds": round(time.perf_counter() - started, 3),
    }
    return outcome


def plan(
    config: Any,
    *,
    method: str,
    target_sparsity: float,
    sparsity_basis: SparsityBasis = "layers",
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The cheap dry-run plan of a method: what it would remove, parameters before/after."""
    validate_target(target_sparsity, sparsity_basis)
    spec = get_method(method)
    return spec.plan(config, target_sparsity, sparsity_basis, parse_options(spec, options))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        slimforge = version("slimforge")
    except PackageNotFoundError:
        slimforge = "unknown"
    return {
        "slimforge": slimforge,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
