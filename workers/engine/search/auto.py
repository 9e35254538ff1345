"""`method: "auto"`: run the cheap layer selectors on the same calibration and keep the best.

Each selector (with the shared options, compensation included) prunes a copy of the model using
the fit part of the calibration; the candidates are ranked by their next-token loss on the
held-out rows of the calibration, which none of them saw. All candidates go in the report.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import PretrainedConfig

from workers.engine.methods.layer_common import CompensatedOptions, plan_layer_method
from workers.engine.params import count_parameters
from workers.engine.registry import Method, get_method, parse_options, register
from workers.engine.types import EngineError, PruneContext, PruneOutcome, SparsityBasis

Selector = Literal["gradmap", "shortgpt", "taylor_plus", "sleb"]
SHARED_FIELDS = ("compensation", "micro_batch_size", "compensation_placement", "compensation_ridge")


class AutoOptions(CompensatedOptions):
    selectors: list[Selector] = Field(
        default_factory=lambda: ["gradmap", "shortgpt", "taylor_plus", "sleb"],
        min_length=1,
        description="Layer selectors to compare (SLEB only when the model is small, see sleb_max_parameters).",
    )
    sleb_max_parameters: int = Field(
        400_000_000, ge=0, description="SLEB (one forward per candidate layer per decision) runs only below this size."
    )
    heldout_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="Calibration rows kept for ranking.")


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tokens: torch.Tensor, micro_batch_size: int) -> float:
    """Mean next-token loss over `tokens` ([n, seq_len])."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], micro_batch_size):
        batch = tokens[start : start + micro_batch_size].to(device)
        total += float(model(input_ids=batch, labels=batch, use_cache=False).loss) * batch.shape[0]
        count += batch.shape[0]
    return total / count


def run_auto(ctx: PruneContext) -> PruneOutcome:
    options: AutoOptions = ctx.options  # type: ignore[assignment]
    n = ctx.calibration.shape[0]
    n_held = max(1, round(n * options.heldout_fraction))
    if n - n_held < 1:
        raise EngineError(
            "calibration_too_small", "method 'auto' needs at least 2 calibration samples (fit + held-out)."
        )
    fit, held = ctx.calibration[: n - n_held], ctx.calibration[n - n_held :]
    size = count_parameters(ctx.model)["total"]
    shared = {name: getattr(options, name) for name in SHARED_FIELDS}
    candidates: list[dict[str, Any]] = []
    best: tuple[float, PruneOutcome, str] | None = None
    for index, name in enumerate(options.selectors):
        if name == "sleb" and size > options.sleb_max_parameters:
            candidates.append({"selector": name, "skipped": f"model has {size} > {options.sleb_max_parameters} params"})
            continue
        ctx.check_cancel()
        ctx.progress("scoring", index / len(options.selectors), f"auto: trying {name}")
        spec = get_method(name)
        sub = dataclasses.replace(
            ctx,
            model=copy.deepcopy(ctx.model),
            calibration=fit,
            options=parse_options(spec, shared),
            progress=lambda stage, fraction, message=None, name=name: ctx.progress(
                stage, fraction, f"{name}: {message}"
            ),
        )
        started = time.perf_counter()
        outcome = spec.run(sub)
        loss = heldout_loss(outcome.model, held, options.micro_batch_size)
        candidates.append(
            {
                "selector": name,
                "removed_layers": outcome.report["removed_layers"],
                "heldout_loss": round(loss, 5),
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        if best is None or loss < best[0]:
            best = (loss, outcome, name)
        else:
            del outcome
    assert best is not None
    _, outcome, chosen = best
    outcome.report["auto"] = {
        "chosen": chosen,
        "ranking": "next-token loss on held-out calibration rows",
        "fit_samples": n - n_held,
        "heldout_samples": n_held,
        "candidates": candidates,
    }
    return outcome


def plan_auto(config: PretrainedConfig, target: float, basis: SparsityBasis, options: AutoOptions) -> dict[str, Any]:
    return {**plan_layer_method(config, target, basis, options, name="auto"), "selectors": options.selectors}


METHOD = register(
    Method(
        name="auto",
        kind="layer",
        description="Run the cheap layer selectors (GradMAP, ShortGPT, Taylor+, SLEB on small models) on the same "
        "calibration and keep the one with the lowest held-out calibration loss; all are in the report.",
        options_model=AutoOptions,
        run=run_auto,
        plan=plan_auto,
    )
)
