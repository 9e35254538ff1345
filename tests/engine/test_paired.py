"""Paired differences of per-item outcomes (benchmark comparisons of two models on the same items)."""

from __future__ import annotations

import math

import pytest

from workers.engine.evaluation.paired import paired_average_difference, paired_difference


def test_paired_difference_of_identical_models_is_exactly_zero():
    hits = [1, 0, 1, 1, 0, 0, 1]
    assert paired_difference(hits, hits) == (0.0, 0.0)


def test_paired_difference_matches_the_hand_computation():
    a = [1, 1, 0, 1]
    b = [0, 1, 0, 0]
    mean, stderr = paired_difference(a, b)  # differences 1, 0, 0, 1
    assert mean == 0.5
    assert stderr == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))


def test_pairing_is_tighter_than_comparing_two_averages():
    # Two models that agree on all but two of 400 items: the unpaired standard error of the
    # difference is ~3.5 points, the paired one well under one.
    a = [i % 2 for i in range(400)]
    b = list(a)
    b[0], b[2] = 1, 1
    mean, stderr = paired_difference(a, b)
    unpaired = math.sqrt(2 * 0.25 / 400)
    assert mean == pytest.approx(-2 / 400)
    assert stderr < unpaired / 5


def test_average_over_tasks_combines_independent_errors():
    a = {"x": [1, 0, 1, 0], "y": [1, 1, 1, 1]}
    b = {"x": [0, 0, 1, 0], "y": [1, 0, 1, 1]}
    mean, stderr = paired_average_difference(a, b)
    (mx, sx), (my, sy) = paired_difference(a["x"], b["x"]), paired_difference(a["y"], b["y"])
    assert mean == pytest.approx((mx + my) / 2)
    assert stderr == pytest.approx(math.sqrt(sx**2 + sy**2) / 2)


def test_mismatched_items_or_tasks_are_refused():
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])
    with pytest.raises(ValueError):
        paired_average_difference({"x": [1]}, {"y": [1]})
