"""Search over candidate sizes for the most-pruned one that meets a quality budget.

Candidates are ordered from least to most pruned. Quality is assumed to get worse with size
(true on average for prefix-consistent removal orders), so a binary search needs about
log2(n) probes; `full` probes every candidate and picks the largest passing one without that
assumption. Every probe is kept: it is the size/quality curve of the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.engine.types import EngineError


@dataclass
class ProbeResult:
    size: float  # k (layers) or a parameter sparsity
    value: float  # the budget metric (perplexity ratio or accuracy)
    meets: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "value": round(self.value, 5), "meets": self.meets, **self.extra}


@dataclass
class SearchResult:
    chosen: ProbeResult | None
    curve: list[ProbeResult]


def largest_passing(
    candidates: Sequence[float],
    probe: Callable[[float], ProbeResult],
    *,
    full: bool = False,
    gallop: bool = False,
) -> SearchResult:
    """The largest candidate whose probe meets the budget (None when none does), and every probe made.

    `gallop` probes candidates 1, 2, 4, 8, ... (by position) until one fails, then bisects the last
    gap: the most-pruned candidate probed stays within about twice the answer, which is what makes
    a lazily grown removal order cheap. Plain bisection starts in the middle instead.
    """
    curve: list[ProbeResult] = []
    if full:
        curve = [probe(size) for size in candidates]
        passing = [p for p in curve if p.meets]
        return SearchResult(chosen=passing[-1] if passing else None, curve=curve)
    lo, hi, best = 0, len(candidates) - 1, None
    at = 0
    while gallop and at <= hi:  # positions 0, 1, 3, 7, ... (then the last one)
        result = probe(candidates[at])
        curve.append(result)
        if not result.meets:
            hi = at - 1
            break
        best, lo = result, at + 1
        at = 2 * at + 1
        if at > hi and lo <= hi:
            at = hi
    return _bisect(candidates, lo, hi, best, probe, curve)


def largest_passing_from(
    candidates: Sequence[float], start: int, probe: Callable[[float], ProbeResult]
) -> SearchResult:
    """`largest_passing` from a guess: probe `candidates[start]`, then step away from it by 1, 2, 4, ...
    positions (up while probes meet, down while they fail) and bisect the last gap. A guess just
    past the answer costs two probes, one that is off by one three.
    """
    curve: list[ProbeResult] = []

    def run(position: int) -> ProbeResult:
        result = probe(candidates[position])
        curve.append(result)
        return result

    lo, hi, best, step = 0, len(candidates) - 1, None, 1
    if run(start).meets:
        best, lo = curve[-1], start + 1
        while lo <= hi:
            result = run(at := min(start + step, hi))
            if not result.meets:
                hi = at - 1
                break
            best, lo, step = result, at + 1, 2 * step
    else:
        hi = start - 1
        while lo <= hi:
            result = run(at := max(start - step, lo))
            if result.meets:
                best, lo = result, at + 1
                break
            hi, step = at - 1, 2 * step
    return _bisect(candidates, lo, hi, best, probe, curve)


def scaled_prediction_miss(
    size: float,
    exact: dict[float, ProbeResult],
    predictions: Sequence[ProbeResult],
    meets: Callable[[float], bool],
) -> ProbeResult | None:
    """A miss at `size` decided without a probe, or None where it needs one.

    The prediction of `size` is scaled by the prediction's error at the exact probe one size below:
    prediction(size) x exact(size - 1) / prediction(size - 1). It decides only where that probe met
    the budget as predicted, and where the scaled value misses by more than its standard error
    (predictions are perplexity ratios: lower is better).
    """
    said = {p.size: p for p in predictions}
    below, here, before = exact.get(size - 1), said.get(size), said.get(size - 1)
    if below is None or here is None or before is None or not (below.meets and before.meets):
        return None
    scale = below.value / before.value
    value, stderr = here.value * scale, here.extra["stderr"] * scale
    if meets(value - stderr):
        return None
    extra = {"exact": False, "prediction": round(here.value, 5), "scaled_by": round(scale, 5)}
    return ProbeResult(size=size, value=value, meets=False, extra={**extra, "stderr": round(stderr, 5)})


def _bisect(
    candidates: Sequence[float],
    lo: int,
    hi: int,
    best: ProbeResult | None,
    probe: Callable[[float], ProbeResult],
    curve: list[ProbeResult],
) -> SearchResult:
    """Bisect positions lo..hi, knowing everything below lo passes (`best`, the largest) and above hi fails."""
    while lo <= hi:
        mid = (lo + hi) // 2
        result = probe(candidates[mid])
        curve.append(result)
        if result.meets:
            best, lo = result, mid + 1
        else:
            hi = mid - 1
    return SearchResult(chosen=best, curve=sorted(curve, key=lambda p: p.size))


def no_candidate_error(budget: str, curve: list[ProbeResult], metric: str) -> EngineError:
    """The clear error of a budget that nothing meets: what was tried and how close it came."""
    tried = ", ".join(f"size {p.size:g}: {metric} {p.value:.4g}" for p in curve)
    return EngineError(
        "target_unreachable",
        f"No candidate meets the budget ({budget}). Probed: {tried}. Loosen the budget, add recovery, "
        "or use a smaller step.",
    )
