"""Paired comparisons of two models scored on the same items: differences with their standard error.

Scoring both models on the same questions removes the items' own difficulty from the comparison,
so the standard error of a *difference* is far smaller than either accuracy's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of a - b over paired samples and its standard error (sample std / sqrt(n))."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return float("nan"), float("nan")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / n
    if n < 2:
        return mean, 0.0
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(variance / n)


def paired_average_difference(
    a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]]
) -> tuple[float, float]:
    """Difference of the task-averaged accuracies of a and b (per-item 0/1 outcomes per task, the same
    items in the same order) and its standard error; the tasks are independent samples."""
    tasks = sorted(a)
    if sorted(b) != tasks or not tasks:
        raise ValueError("both models must be scored on the same, non-empty set of tasks")
    per_task = [paired_difference(a[t], b[t]) for t in tasks]
    mean = sum(m for m, _ in per_task) / len(tasks)
    stderr = math.sqrt(sum(s * s for _, s in per_task)) / len(tasks)
    return mean, stderr
