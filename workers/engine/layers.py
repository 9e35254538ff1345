"""Generic decoder-layer surgery for Hugging Face decoder-only models.

Works for any model that keeps its blocks in one `nn.ModuleList` of length `num_hidden_layers`
(LLaMA/SmolLM, Mistral, Qwen2/3, Gemma-2/3, ...). Removing layers must leave a model that runs
`generate()` with a KV cache and round-trips `save_pretrained`/`from_pretrained` with no custom code,
so besides the module list we re-index every per-layer `layer_idx` (the cache is indexed by it) and
slice every per-layer list in the config (`layer_types`, ...).

`layer_subset` applies the same surgery temporarily (a context manager): methods use it to evaluate
"the model without layers S" without copying weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.engine.types import EngineError

_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")
# Config attributes that are per-layer lists even when their name does not say "layer".
_PER_LAYER_KEYS = ("layer_types", "mlp_layer_types", "no_rope_layers", "sliding_window_pattern_list")


@dataclass
class LayerLocation:
    """Where a model keeps its decoder blocks."""

    parent: nn.Module  # the module owning the list (e.g. `model.model`)
    attr: str  # attribute name of the list on `parent` (usually "layers")
    path: str  # dotted path from the root model, for messages

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.parent, self.attr)


def main_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise EngineError("unsupported_model", "Model has no `config`; only Hugging Face models are supported.")
    # Multimodal wrappers keep the decoder's settings in a text sub-config.
    if getattr(config, "num_hidden_layers", None) is None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def num_layers(model: nn.Module) -> int:
    return len(find_layers(model).layers)


def find_layers(model: nn.Module) -> LayerLocation:
    """Locate the decoder-block list: a ModuleList as long as `num_hidden_layers`, preferring `*.layers`."""
    expected = getattr(main_config(model), "num_hidden_layers", None)
    candidates: list[tuple[int, str]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if expected is not None and len(module) != expected:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        # Rank: named "layers" first, then the shallowest path.
        rank = (0 if name.split(".")[-1] in ("layers", "h", "blocks") else 1) * 100 + name.count(".")
        candidates.append((rank, name))
    if not candidates:
        raise EngineError(
            "unsupported_model",
            f"Could not find the decoder layers of {type(model).__name__}: no ModuleList of "
            f"num_hidden_layers={expected} identical blocks.",
        )
    _, path = min(candidates)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return LayerLocation(parent=parent, attr=attr, path=path)


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder block (a sibling of the layer list), or None."""
    parent = find_layers(model).parent
    for name in _NORM_NAMES:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _configs(model: nn.Module, n_layers: int) -> list[Any]:
    """Every distinct config object in the model that describes the decoder stack."""
    seen: dict[int, Any] = {}
    candidates = [getattr(model, "config", None)]
    candidates += [getattr(m, "config", None) for m in model.modules()]
    for config in list(candidates):
        if config is not None and hasattr(config, "get_text_config"):
            candidates.append(config.get_text_config())
    for config in candidates:
        if config is not None and getattr(config, "num_hidden_layers", None) == n_layers:
            seen.setdefault(id(config), config)
    return list(seen.values())


def _per_layer_keys(config: Any, n_layers: int) -> list[str]:
    keys = []
    for key, value in vars(config).items():
        if not isinstance(value, list | tuple) or len(value) != n_layers:
            continue
        if key in _PER_LAYER_KEYS or "layer" in key:
            keys.append(key)
    return keys


@dataclass
class _Snapshot:
    """What `_apply_subset` changed, so `layer_subset` can undo it."""

    location: LayerLocation
    layers: nn.ModuleList
    layer_idx: list[tuple[nn.Module, int]] = field(default_factory=list)
    config_values: list[tuple[Any, str, Any]] = field(default_factory=list)


def _apply_subset(model: nn.Module, keep: Sequence[int]) -> _Snapshot:
    location = find_layers(model)
    old = location.layers
    n_old = len(old)
    keep = sorted(set(int(i) for i in keep))
    if not keep:
        raise EngineError("invalid_sparsity", "Cannot remove every decoder layer; at least one must remain.")
    if keep[0] < 0 or keep[-1] >= n_old:
        raise EngineError("invalid_layers", f"Layer indices must lie in [0, {n_old - 1}], got {keep}.")
    snapshot = _Snapshot(location=location, layers=old)
    configs = _configs(model, n_old)

    new = nn.ModuleList([old[i] for i in keep])
    for new_index, block in enumerate(new):
        # The KV cache and per-layer masks are indexed by `layer_idx`: it must be the new position.
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                snapshot.layer_idx.append((module, module.layer_idx))
                module.layer_idx = new_index
    setattr(location.parent, location.attr, new)

    for config in configs:
        for key in _per_layer_keys(config, n_old):
            value = getattr(config, key)
            snapshot.config_values.append((config, key, value))
            sliced = [value[i] for i in keep]
            setattr(config, key, type(value)(sliced) if isinstance(value, tuple) else sliced)
        window = getattr(config, "max_window_layers", None)
        if isinstance(window, int):
            # Qwen2/3: layers with index >= max_window_layers use sliding windows; keep each kept
            # layer's kind by counting how many kept layers were below the old boundary.
            snapshot.config_values.append((config, "max_window_layers", window))
            config.max_window_layers = sum(1 for i in keep if i < window)
        snapshot.config_values.append((config, "num_hidden_layers", n_old))
        config.num_hidden_layers = len(keep)
    return snapshot


def _restore(snapshot: _Snapshot) -> None:
    setattr(snapshot.location.parent, snapshot.location.attr, snapshot.layers)
    for module, index in snapshot.layer_idx:
        module.layer_idx = index
    # Undo in reverse so a key changed twice ends at its first value.
    for config, key, value in reversed(snapshot.config_values):
        setattr(config, key, value)


def remove_layers(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Remove decoder layers (indices in the model's current numbering) in place; returns the model."""
    n = num_layers(model)
    drop = sorted(set(int(i) for i in indices))
    if any(i < 0 or i >= n for i in drop):
        raise EngineError("invalid_layers", f"Layer indices must lie in [0, {n - 1}], got {drop}.")
    if not drop:
        return model
    _apply_subset(model, [i for i in range(n) if i not in set(drop)])
    return model


@contextmanager
def layer_subset(model: nn.Module, keep: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily run `model` with only the layers `keep` (current numbering); restored on exit."""
    snapshot = _apply_subset(model, keep)
    try:
        yield model
    finally:
        _restore(snapshot)


def layer_parameter_count(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
