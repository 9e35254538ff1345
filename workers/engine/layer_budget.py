"""Turn a sparsity target into a number of decoder layers to remove, and report what was achieved.

Two bases:
- `layers`: k = round(target x n_layers).
- `parameters`: the k whose removal best matches target x total parameters (tied weights once).
Parameter counts come from the live model, or from a config alone by building the model on the
`meta` device (no memory, no weights), so dry-run plans stay cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from workers.engine.layers import find_layers
from workers.engine.params import count_parameters
from workers.engine.types import EngineError, SparsityBasis


@dataclass(frozen=True)
class LayerProfile:
    """Parameter counts of a decoder stack: per layer, in total and without embeddings/LM head."""

    per_layer: tuple[int, ...]
    total: int
    without_embeddings: int

    @property
    def n_layers(self) -> int:
        return len(self.per_layer)


def profile_model(model: torch.nn.Module) -> LayerProfile:
    layers = find_layers(model).layers
    counts = count_parameters(model)
    per_layer = tuple(sum(p.numel() for p in block.parameters()) for block in layers)
    return LayerProfile(per_layer, counts["total"], counts["without_embeddings"])


def profile_config(config: Any) -> LayerProfile:
    """Profile a config without allocating weights (model built on the meta device)."""
    return _profile_config_json(config.to_json_string(use_diff=False), type(config).__module__, type(config).__name__)


@lru_cache(maxsize=32)
def _profile_config_json(config_json: str, module: str, name: str) -> LayerProfile:
    import importlib

    from transformers import AutoModelForCausalLM

    config_cls = getattr(importlib.import_module(module), name)
    config = config_cls.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return profile_model(model)


def resolve_k(profile: LayerProfile, target_sparsity: float, basis: SparsityBasis) -> int:
    """Number of layers to remove for a target; EngineError('invalid_sparsity') unless 1 <= k <= n-1."""
    n = profile.n_layers
    if basis == "layers":
        k = math.floor(target_sparsity * n + 0.5)
        wanted = f"{target_sparsity:.0%} of {n} layers"
    elif basis == "parameters":
        mean_layer = sum(profile.per_layer) / n
        # Closest achievable removal to the target; layers of one model have (near) equal size.
        k = math.floor(target_sparsity * profile.total / mean_layer + 0.5)
        wanted = f"{target_sparsity:.0%} of {profile.total:,} parameters (one layer is ~{mean_layer:,.0f})"
    else:
        raise EngineError("invalid_sparsity", f"sparsity_basis must be 'layers' or 'parameters', not {basis!r}.")
    if k < 1:
        raise EngineError(
            "invalid_sparsity",
            f"Target {wanted} rounds to removing no layer; raise target_sparsity to remove at least one layer.",
        )
    if k > n - 1:
        raise EngineError(
            "invalid_sparsity",
            f"Target {wanted} would remove {k} of {n} layers; at most {n - 1} can be removed "
            "(at least one layer must remain). Lower target_sparsity.",
        )
    return k


def achieved_sparsity(profile: LayerProfile, removed: Sequence[int]) -> dict[str, float]:
    """Achieved sparsity on both bases for a set of removed layers (original indices)."""
    removed_params = sum(profile.per_layer[i] for i in set(removed))
    return {
        "layers": len(set(removed)) / profile.n_layers,
        "parameters": removed_params / profile.total,
        "parameters_without_embeddings": removed_params / profile.without_embeddings,
    }


def parameters_after(profile: LayerProfile, removed: Sequence[int]) -> dict[str, int]:
    removed_params = sum(profile.per_layer[i] for i in set(removed))
    return {"total": profile.total - removed_params, "without_embeddings": profile.without_embeddings - removed_params}


def estimated_removal(profile: LayerProfile, k: int) -> list[int]:
    """Layers to assume for parameter estimates when the selection needs data (largest count ties)."""
    # Layers are usually identical in size; any k of them give the same count. Use the first k.
    return list(range(k))
