"""The engine's entry point: validate a request, run a method, and add the common report fields."""

from __future__ import annotations

import platform
import random
import time
from typing import Any

import torch
import transformers

from workers.engine.params import count_parameters
from workers.engine.registry import get_method, parse_options
from workers.engine.resources import PeakMemory
from workers.engine.types import (
    CancelCheck,
    EngineError,
    MethodOptions,
    ProgressFn,
    PruneContext,
    PruneOutcome,
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
) -> PruneOutcome:
    """Prune `model` (in place) with a registered method and return it with its report."""
    validate_target(target_sparsity, sparsity_basis)
    spec = get_method(method)
    opts = options if isinstance(options, MethodOptions) else parse_options(spec, options)
    seed_everything(seed)
    before = count_parameters(model)
    ctx = PruneContext(
        model=model,
        calibration=calibration,
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
    started = time.perf_counter()
    with PeakMemory() as memory:
        outcome = spec.run(ctx)
    after = count_parameters(outcome.model)
    report = {
        "method": method,
        "options": opts.model_dump(mode="json"),
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
