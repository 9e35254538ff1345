"""Registry of pruning methods: one entry per `method` name accepted by jobs and the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from transformers import PretrainedConfig

from workers.engine.types import EngineError, MethodOptions, PruneContext, PruneOutcome, SparsityBasis


@dataclass(frozen=True)
class Method:
    name: str
    kind: Literal["layer", "width"]
    description: str
    options_model: type[MethodOptions]
    run: Callable[[PruneContext], PruneOutcome]
    # plan(config, target_sparsity, basis, options) -> dict: what a dry run would remove, cheaply.
    plan: Callable[[PretrainedConfig, float, SparsityBasis, MethodOptions], dict[str, Any]]
    # resumable(options): whether the selector continues a removal order exactly (PruneContext.resume_from).
    resumable: Callable[[MethodOptions], bool] | None = None
    # predicts(options): whether the selector calls PruneContext.after_decision with a model close to
    # what a single job publishes at that size (in-loop compensation), so a search can predict from it.
    predicts: Callable[[MethodOptions], bool] | None = None


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    _METHODS[method.name] = method
    return method


def _load_builtin_methods() -> None:
    # Importing the packages registers every built-in method exactly once.
    import workers.engine.methods  # noqa: F401
    import workers.engine.search.auto  # noqa: F401


def get_method(name: str) -> Method:
    _load_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS))
        raise EngineError("unknown_method", f"Unknown method {name!r}. Known methods: {known}.") from None


def all_methods() -> dict[str, Method]:
    _load_builtin_methods()
    return dict(sorted(_METHODS.items()))


def parse_options(method: Method, raw: dict[str, Any] | None) -> MethodOptions:
    """Validate a raw options dict against the method's options model (raises pydantic errors)."""
    return method.options_model.model_validate(raw or {})
