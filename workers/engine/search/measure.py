"""Quality measures of a probe: perplexity on held-out tokens, or mean zero-shot accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Measure = Callable[[torch.nn.Module], float]


@dataclass
class PairedRatio:
    """A probe's perplexity ratio to the dense model on the segments it scored, paired per segment."""

    ratio: float  # exp(mean over scored segments of (probe NLL - dense NLL))
    stderr: float  # standard error of that ratio (delta method on the paired differences)
    perplexity: float  # the probe's own perplexity on the same segments
    segments: int
    complete: bool  # False when the sequential test stopped before the end of the text


class PerplexityMeasure:
    """Perplexity on held-out token ids (`measure(model)` is the full perplexity).

    `ratio_against(model, dense, max_ratio)` scores a probe against the budget with a sequential
    test: both models see the same segments, so the per-segment NLL differences have a far smaller
    spread than either perplexity, and once their mean is `z` standard errors away from
    log(max_ratio) the rest of the text cannot change the decision; scoring stops there. Probes
    far from the budget then cost a fraction of the text; those near it score all of it.
    """

    def __init__(
        self,
        ids: torch.Tensor,
        seq_len: int,
        *,
        z: float = 3.0,
        min_segments: int = 16,
        dense_cache: Callable[[Callable[[], dict[str, Any]]], dict[str, Any]] | None = None,
    ) -> None:
        self.ids, self.seq_len, self.z, self.min_segments = ids, seq_len, z, min_segments
        # `dense_cache(compute)` returns a stored `full()` of the dense model, or computes and stores
        # it: the service keys it by model and exact tokens, so repeated searches skip that pass.
        self.dense_cache = dense_cache

    def dense(self, model: torch.nn.Module) -> dict[str, Any]:
        """`full()` of the dense model, from the cache when one is set."""
        if self.dense_cache is None:
            return self.full(model)
        return self.dense_cache(lambda: self.full(model))

    def full(self, model: torch.nn.Module, stop: Callable[[torch.Tensor], bool] | None = None) -> dict[str, Any]:
        from workers.engine.evaluation import perplexity

        model.eval()
        return perplexity(model, self.ids, seq_len=self.seq_len, stop=stop)

    def __call__(self, model: torch.nn.Module) -> float:
        return float(self.full(model)["ppl"])

    def ratio_against(self, model: torch.nn.Module, dense: dict[str, Any], max_ratio: float) -> PairedRatio:
        """The probe's ratio to `dense` (a `full()` result of the dense model), stopping once decided."""
        reference = torch.tensor(dense["segment_nll"], dtype=torch.float64)
        threshold = math.log(max_ratio)

        def decided(segment_nll: torch.Tensor) -> bool:
            if segment_nll.numel() < max(self.min_segments, 2):
                return False
            mean, stderr = _paired(segment_nll.double(), reference)
            return abs(mean - threshold) > self.z * stderr

        scored = self.full(model, stop=decided)
        mean, stderr = _paired(torch.tensor(scored["segment_nll"], dtype=torch.float64), reference)
        return PairedRatio(
            ratio=math.exp(mean),
            stderr=math.exp(mean) * stderr,
            perplexity=float(scored["ppl"]),
            segments=scored["n_segments"],
            complete=bool(scored["complete"]),
        )


def _paired(segment_nll: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the per-segment NLL differences to the first segments of `reference`."""
    diff = segment_nll - reference[: segment_nll.numel()]
    n = diff.numel()
    return float(diff.mean()), (float(diff.std()) / math.sqrt(n) if n > 1 else 0.0)


def perplexity_measure(ids: torch.Tensor, seq_len: int) -> PerplexityMeasure:
    return PerplexityMeasure(ids, seq_len)


def zero_shot_measure(tokenizer: Any, tasks: list[str], data_dir: Path, limit: int, seed: int = 0) -> Measure:
    from workers.engine.evaluation import zero_shot

    def measure(model: torch.nn.Module) -> float:
        model.eval()
        scores = zero_shot(model, tokenizer, tasks, data_dir, limit=limit, seed=seed)
        return sum(s["acc"] for s in scores.values()) / len(scores)

    return measure
