"""Quality measures of a probe: perplexity on held-out tokens, or mean zero-shot accuracy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Measure = Callable[[torch.nn.Module], float]


def perplexity_measure(ids: torch.Tensor, seq_len: int) -> Measure:
    from workers.engine.evaluation import perplexity

    def measure(model: torch.nn.Module) -> float:
        model.eval()
        return float(perplexity(model, ids, seq_len=seq_len)["ppl"])

    return measure


def zero_shot_measure(tokenizer: Any, tasks: list[str], data_dir: Path, limit: int, seed: int = 0) -> Measure:
    from workers.engine.evaluation import zero_shot

    def measure(model: torch.nn.Module) -> float:
        model.eval()
        scores = zero_shot(model, tokenizer, tasks, data_dir, limit=limit, seed=seed)
        return sum(s["acc"] for s in scores.values()) / len(scores)

    return measure
