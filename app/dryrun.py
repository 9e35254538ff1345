"""Dry runs: the plan of a job from the model's config.json alone, bounded in time.

A dry run answers inside the request, so it never loads weights, dequantises a GGUF or
downloads anything (workers/engine/modelzoo.config_path); a config that cannot be read or
planned is the client's model problem, answered 422 `invalid_model_config`.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from app.errors import ApiError
from app.schemas import JobCreate
from app.settings import Settings
from workers.engine.modelzoo import config_path
from workers.engine.pipeline import plan
from workers.engine.types import EngineError

MAX_CONFIG_BYTES = 1 << 20
# Plans are CPU-bound and short; a small pool keeps a flood of dry runs from taking every thread.
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dry-run")


def _broken(model: str, why: str) -> ApiError:
    return ApiError(422, "invalid_model_config", f"The config.json of {model!r} cannot be used: {why}.")


def load_config(path: Path, model: str) -> Any:
    """A transformers config built from `path` (a config.json) without touching any other file."""
    from transformers import AutoConfig

    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise _broken(model, f"it cannot be read ({exc.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise _broken(model, f"it is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _broken(model, f"it is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise _broken(model, "it is not a JSON object with a string 'model_type'")
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # transformers raises ValueError/TypeError/KeyError for bad values
        raise _broken(model, f"{type(exc).__name__}: {exc}") from None


def _plan(body: JobCreate, spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    path = config_path(body.model, settings.allowed_model_roots, settings.models_dir)
    config = load_config(path, body.model)
    try:
        resolved = plan(
            config,
            method=body.method,
            # A quality-targeted job is planned at its most-pruned candidate.
            target_sparsity=body.target_sparsity if body.target is None else body.target.max_sparsity,
            sparsity_basis=body.sparsity_basis,
            options=spec["options"],
        )
    except (EngineError, ApiError):
        raise
    except Exception as exc:  # a config with missing or nonsensical sizes fails inside the planner
        raise _broken(body.model, f"planning failed with {type(exc).__name__}: {exc}") from None
    if body.target is not None:
        resolved["quality_target"] = {**spec["target"], "plan_is_for": "the most-pruned candidate (max_sparsity)"}
    if body.recovery is not None:
        from workers.engine.recovery import estimate

        params = resolved["parameters_after"]["total"]
        resolved["recovery"] = {**spec["recovery"], **estimate(body.recovery, params, settings.device)}
    return resolved


def dry_run(body: JobCreate, spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    future = _POOL.submit(_plan, body, spec, settings)
    try:
        resolved = future.result(timeout=settings.dry_run_timeout_seconds)
    except FutureTimeout:
        future.cancel()
        raise ApiError(
            422,
            "dry_run_timeout",
            f"Planning {body.model!r} took longer than {settings.dry_run_timeout_seconds} s; "
            "submit the job without dry_run, or try a smaller model.",
        ) from None
    return {"dry_run": True, "model": body.model, "method": body.method, "plan": resolved, "spec": spec}
