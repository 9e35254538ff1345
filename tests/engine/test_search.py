"""Quality-targeted search and method "auto" on tiny random models with constructed quality curves."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from tests.conftest import make_tiny_llama
from workers.engine.layers import find_layers
from workers.engine.pipeline import prune, search
from workers.engine.search import PerplexityMeasure, ProbeResult, QualityTarget, largest_passing
from workers.engine.search.curve import largest_passing_from
from workers.engine.search.measure import PairedRatio
from workers.engine.types import EngineError

# Perplexity ratio after removing k layers: known answer for any budget.
CURVE = {1: 1.04, 2: 1.1, 3: 1.22, 4: 1.35, 5: 1.6, 6: 2.1, 7: 3.0}


def ids(n: int = 6, seq: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def curve_probe(budget: float, calls: list[float]):
    def probe(k: float) -> ProbeResult:
        calls.append(k)
        return ProbeResult(size=k, value=CURVE[int(k)], meets=CURVE[int(k)] <= budget)

    return probe


@pytest.mark.parametrize(("budget", "expected"), [(1.3, 3), (1.05, 1), (2.5, 6), (5.0, 7)])
@pytest.mark.parametrize("full", [False, True])
def test_search_picks_largest_size_within_budget(budget, expected, full):
    calls: list[float] = []
    found = largest_passing(list(CURVE), curve_probe(budget, calls), full=full)
    assert found.chosen is not None and found.chosen.size == expected
    assert [p.size for p in found.curve] == sorted(calls)
    assert len(calls) == (len(CURVE) if full else 3)  # binary search: log2(7) probes


def test_search_without_passing_candidate_returns_none():
    found = largest_passing(list(CURVE), curve_probe(1.01, []))
    assert found.chosen is None and found.curve


def layer_count_measure(dense_layers: int = 4):
    """'Perplexity' 10 x CURVE[k] for a model with k layers removed (10 when dense)."""

    def measure(model) -> float:
        removed = dense_layers - len(find_layers(model).layers)
        return 10.0 * (CURVE[removed] if removed else 1.0)

    return measure


def test_pipeline_search_publishes_largest_k_and_stores_curve(tiny_llama):
    target = {"max_perplexity_ratio": 1.15, "max_sparsity": 0.75, "full_curve": True}
    outcome = search(tiny_llama, ids(), method="gradmap", target=target, measure=layer_count_measure())
    report = outcome.report
    assert len(find_layers(outcome.model).layers) == 2  # k=2 is the largest with ratio <= 1.15
    assert len(find_layers(tiny_llama).layers) == 4  # the dense model is untouched
    q = report["quality_target"]
    assert q["chosen_size"] == 2 and [p["size"] for p in q["curve"]] == [1, 2, 3]
    assert [p["meets"] for p in q["curve"]] == [True, True, False]
    assert report["removed_layers"] == sorted(q["removal_order"][:2])  # a prefix of the one order
    assert report["compensation"]["enabled"] is True


def test_search_probes_compensate_on_compensation_data_like_a_single_job(tiny_llama):
    import copy

    extra = ids(n=12, seed=2)
    target = {"max_perplexity_ratio": 1.15, "max_sparsity": 0.75}
    found = search(
        copy.deepcopy(tiny_llama),
        ids(),
        method="gradmap",
        target=target,
        measure=layer_count_measure(),
        compensation_data=extra,
    )
    single = prune(copy.deepcopy(tiny_llama), ids(), method="gradmap", target_sparsity=0.5, compensation_data=extra)
    assert found.report["compensation"]["source"] == "compensation_data"
    assert found.report["removed_layers"] == single.report["removed_layers"]
    for name, weight in single.model.state_dict().items():  # the same projections, fitted on the same rows
        assert torch.allclose(found.model.state_dict()[name], weight, atol=1e-6), name


def test_cheap_probes_then_the_chosen_size_is_refitted_on_every_window(tiny_llama):
    """Probes compensate on the first `probe_compensation_samples` windows; the published model is
    the single job at the chosen size (all windows), unless that one misses the budget."""
    extra = ids(n=12, seed=2)
    target = {"max_perplexity_ratio": 1.15, "max_sparsity": 0.75, "probe_compensation_samples": 4}
    single = prune(copy.deepcopy(tiny_llama), ids(), method="gradmap", target_sparsity=0.5, compensation_data=extra)

    def run(measure):
        return search(
            copy.deepcopy(tiny_llama), ids(), method="gradmap", target=target, measure=measure, compensation_data=extra
        )

    found = run(layer_count_measure())
    q = found.report["quality_target"]
    assert q["chosen_size"] == 2 and q["refit"]["published"] is True
    assert {p["compensation_tokens"] for p in q["curve"]} == {4 * 20}
    assert q["refit"]["compensation_tokens"] == found.report["compensation"]["compensation_tokens"] == 12 * 20
    assert found.report["removed_layers"] == single.report["removed_layers"]
    for name, weight in single.model.state_dict().items():
        assert torch.allclose(found.model.state_dict()[name], weight, atol=1e-6), name

    def refit_misses(model) -> float:  # the all-window model fails the budget: the probe's model is published
        same = all(torch.allclose(model.state_dict()[n], w, atol=1e-6) for n, w in single.model.state_dict().items())
        return 100.0 if same and len(find_layers(model).layers) == 2 else layer_count_measure()(model)

    fallback = run(refit_misses)
    q = fallback.report["quality_target"]
    assert q["chosen_size"] == 2 and q["refit"] == {**q["refit"], "published": False, "value": 10.0}
    assert q["chosen_value"] == q["probe_value"] == 1.1
    assert fallback.report["compensation"]["compensation_tokens"] == 4 * 20
    assert any(not torch.allclose(fallback.model.state_dict()[n], w) for n, w in single.model.state_dict().items())


def test_search_order_fits_in_loop_compensation_on_the_jobs_compensation_windows():
    """With in-loop compensation (the GradMAP default), the search's removal order sees the same
    compensation windows as a single job, so it removes the same layers."""
    import copy

    model, extra = make_tiny_llama(6), ids(n=16, seed=2)  # in-loop projections change its later decisions
    target = {"max_perplexity_ratio": 10.0, "max_sparsity": 0.5}
    found = search(
        copy.deepcopy(model),
        ids(8),
        method="gradmap",
        target=target,
        measure=layer_count_measure(6),
        compensation_data=extra,
    )
    single = prune(copy.deepcopy(model), ids(8), method="gradmap", target_sparsity=0.5, compensation_data=extra)
    assert found.report["quality_target"]["removal_order"] == single.report["removal_order"]
    assert found.report["removed_layers"] == single.report["removed_layers"]


def test_removal_order_is_prefix_consistent(tiny_llama):
    import copy

    order = prune(copy.deepcopy(tiny_llama), ids(), method="gradmap", target_sparsity=0.75).report["removal_order"]
    single = prune(copy.deepcopy(tiny_llama), ids(), method="gradmap", target_sparsity=0.25).report["removed_layers"]
    assert single == order[:1]


def test_no_candidate_meets_budget_is_a_clear_error(tiny_llama):
    with pytest.raises(EngineError) as caught:
        search(
            tiny_llama, ids(), method="gradmap", target={"max_perplexity_ratio": 1.01}, measure=layer_count_measure()
        )
    assert caught.value.code == "target_unreachable"
    assert (
        "perplexity <= 1.01x dense" in caught.value.message and "size 1: perplexity_ratio 1.04" in caught.value.message
    )


def test_width_method_searches_a_sparsity_grid(tiny_llama):
    dense = sum(p.numel() for p in tiny_llama.parameters())

    def accuracy(model) -> float:  # constructed: 0.9 while over 85 % of the parameters remain, else 0.1
        return 0.9 if sum(p.numel() for p in model.parameters()) > 0.85 * dense else 0.1

    target = {"min_zero_shot_accuracy": 0.5, "tasks": ["piqa"], "max_sparsity": 0.3, "sparsity_step": 0.1}
    options = {"layer_start": 0, "layer_end": 4}
    outcome = search(
        tiny_llama,
        ids(),
        method="llm_pruner",
        sparsity_basis="parameters",
        target=target,
        measure=accuracy,
        options=options,
    )
    q = outcome.report["quality_target"]
    assert q["chosen_size"] == 0.1 and [p["size"] for p in q["curve"]] == [0.1, 0.2]
    assert q["metric"] == "zero_shot_accuracy"


def test_target_needs_exactly_one_budget():
    with pytest.raises(ValidationError, match="exactly one"):
        QualityTarget()
    with pytest.raises(ValidationError, match="exactly one"):
        QualityTarget(max_perplexity_ratio=1.3, min_zero_shot_accuracy=0.4, tasks=["piqa"])
    with pytest.raises(ValidationError, match="unknown perplexity text"):
        QualityTarget(max_perplexity_ratio=1.3, perplexity_set="c4")


def test_auto_keeps_the_selector_with_lowest_heldout_loss(tiny_llama):
    outcome = prune(
        tiny_llama,
        ids(8),
        method="auto",
        target_sparsity=0.25,
        options={"selectors": ["gradmap", "shortgpt", "sleb"], "compensation": False},
    )
    auto = outcome.report["auto"]
    losses = {c["selector"]: c["heldout_loss"] for c in auto["candidates"]}
    assert set(losses) == {"gradmap", "shortgpt", "sleb"}
    assert auto["chosen"] == min(losses, key=losses.get)
    assert auto["fit_samples"] == 6 and auto["heldout_samples"] == 2
    assert len(find_layers(outcome.model).layers) == 3


def test_auto_skips_sleb_on_large_models(tiny_llama):
    outcome = prune(
        tiny_llama,
        ids(8),
        method="auto",
        target_sparsity=0.25,
        options={"selectors": ["shortgpt", "sleb"], "sleb_max_parameters": 10},
    )
    skipped = [c for c in outcome.report["auto"]["candidates"] if "skipped" in c]
    assert [c["selector"] for c in skipped] == ["sleb"]


def stream(n_segments: int = 64, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (n_segments * seq,), generator=torch.Generator().manual_seed(5))


def worse(model):
    """A copy whose predictions are far sharper and wrong: a much higher perplexity."""
    import copy

    damaged = copy.deepcopy(model)
    with torch.no_grad():
        damaged.lm_head.weight.mul_(8.0)
    return damaged


def test_paired_ratio_scores_everything_when_undecided_and_equals_the_full_ratio(tiny_llama):
    from workers.engine.search import PerplexityMeasure

    never = PerplexityMeasure(stream(), 16, z=1e9)
    dense, other = never.full(tiny_llama), worse(tiny_llama)
    scored = never.ratio_against(other, dense, max_ratio=1.5)
    assert scored.complete and scored.segments == 64
    assert scored.ratio == pytest.approx(never(other) / dense["ppl"], rel=1e-5)
    assert scored.perplexity == pytest.approx(never(other), rel=1e-6)


def test_paired_ratio_stops_early_only_when_the_decision_is_clear(tiny_llama):
    from workers.engine.search import PerplexityMeasure

    measure = PerplexityMeasure(stream(), 16)
    dense, other = measure.full(tiny_llama), worse(tiny_llama)
    full_ratio = measure(other) / dense["ppl"]
    assert full_ratio > 2.0
    fails = measure.ratio_against(other, dense, max_ratio=1.2)  # far below the probe's ratio
    passes = measure.ratio_against(other, dense, max_ratio=50.0)  # far above it
    for scored in (fails, passes):
        assert not scored.complete and scored.segments == 16  # decided at the first look
    assert fails.ratio > 1.2 and passes.ratio < 50.0  # the same decisions as the full measure
    same = measure.ratio_against(tiny_llama, dense, max_ratio=1.01)  # identical model: ratio 1, no spread
    assert same.ratio == pytest.approx(1.0) and same.segments == 16


def test_search_with_perplexity_budget_tests_probes_sequentially(tiny_llama):
    from workers.engine.search import PerplexityMeasure

    target = {"max_perplexity_ratio": 1000.0, "max_sparsity": 0.75, "full_curve": True}
    outcome = search(tiny_llama, ids(), method="gradmap", target=target, measure=PerplexityMeasure(stream(), 16))
    q = outcome.report["quality_target"]
    assert q["chosen_size"] == 3 and [p["size"] for p in q["curve"]] == [1, 2, 3]
    for point in q["curve"]:  # every probe is far inside the budget: decided on the first 16 segments
        assert point["meets"] and not point["complete"] and point["segments"] == 16
        assert 0 <= point["stderr"] < point["value"]


@pytest.mark.parametrize(
    ("budget", "expected", "probed"),
    [(1.3, 3, [1, 2, 3, 4]), (1.05, 1, [1, 2]), (2.5, 6, [1, 2, 4, 5, 6, 7]), (5.0, 7, [1, 2, 4, 7])],
)
def test_galloping_search_finds_the_same_answer_probing_up_from_one(budget, expected, probed):
    calls: list[float] = []
    found = largest_passing(list(CURVE), curve_probe(budget, calls), gallop=True)
    assert found.chosen is not None and found.chosen.size == expected
    assert sorted(calls) == probed and calls[:2] == [1, 2]


@pytest.mark.parametrize(("method", "options"), [("gradmap", {}), ("sleb", {})])
def test_resumed_selection_continues_exactly_like_one_run(tiny_llama, method, options):
    import copy

    from workers.engine.pipeline import run_method
    from workers.engine.registry import get_method, parse_options

    spec = get_method(method)
    opts = parse_options(spec, {"compensation": False, **options})
    assert spec.resumable is not None and spec.resumable(opts)

    def order(k: int, resume_from: list[int] | None = None) -> list[int]:
        run = run_method(
            spec.run,
            copy.deepcopy(tiny_llama),
            ids(),
            method=method,
            target_sparsity=k / 4,
            sparsity_basis="layers",
            options=opts,
            resume_from=resume_from,
        )
        return run.report["removal_order"]

    first = order(1)
    assert order(3, resume_from=first) == order(3)


def test_resumed_in_loop_selection_refits_its_prefix_first():
    """In-loop projections of the prefix's cuts shape the next scores: a resumed run rebuilds them,
    so its next decision sees exactly the scores one uninterrupted run saw."""
    import copy

    from workers.engine.pipeline import run_method
    from workers.engine.registry import get_method, parse_options

    model = make_tiny_llama(6)  # in-loop projections change its later decisions
    spec = get_method("gradmap")
    opts = parse_options(spec, {"compensation": False, "compensate_in_loop": True})
    assert spec.resumable is not None and spec.resumable(opts)

    def decisions(k: int, resume_from: list[int] | None = None) -> list[dict]:
        run = run_method(
            spec.run,
            copy.deepcopy(model),
            ids(8),
            method="gradmap",
            target_sparsity=k / 6,
            sparsity_basis="layers",
            options=opts,
            resume_from=resume_from,
        )
        return run.report["decisions"]

    whole = decisions(3)
    assert whole[1]["in_loop_compensation"], "the prefix must carry a projection for this test to bite"
    prefix = [d["chosen"] for d in whole[:2]]
    resumed = decisions(3, resume_from=prefix)
    assert resumed[-1]["chosen"] == whole[-1]["chosen"]
    assert resumed[-1]["scores"] == whole[-1]["scores"]


def test_search_grows_the_removal_order_only_as_far_as_its_probes(tiny_llama):
    target = {"max_perplexity_ratio": 1.05, "max_sparsity": 0.75}
    outcome = search(tiny_llama, ids(), method="gradmap", target=target, measure=layer_count_measure())
    q = outcome.report["quality_target"]
    assert [p["size"] for p in q["curve"]] == [1, 2] and q["chosen_size"] == 1
    assert len(q["removal_order"]) == 2  # k_max is 3: the third decision was never computed
    one = prune(tiny_llama, ids(), method="gradmap", target_sparsity=0.25)
    assert outcome.report["removed_layers"] == one.report["removed_layers"]


def test_dense_side_of_a_search_comes_from_its_cache(tiny_llama, tmp_path):
    """A second search on the same model and tokens reads the dense perplexity from the cache."""
    from workers.engine.evaluation import cached_evaluate
    from workers.engine.search import PerplexityMeasure

    computed = []

    def cache(compute):
        def counted():
            computed.append(1)
            return compute()

        return cached_evaluate(tmp_path, "tiny", {"tokens": "fixed"}, counted)

    target = {"max_perplexity_ratio": 1000.0, "max_sparsity": 0.5}
    curves = []
    for _ in range(2):
        measure = PerplexityMeasure(stream(), 16, dense_cache=cache)
        outcome = search(copy.deepcopy(tiny_llama), ids(), method="gradmap", target=target, measure=measure)
        curves.append(outcome.report["quality_target"])
    assert computed == [1]  # the dense model was scored once
    assert [c["dense_cached"] for c in curves] == [False, True]
    assert curves[0]["dense_value"] == curves[1]["dense_value"]
    assert [p["value"] for p in curves[0]["curve"]] == [p["value"] for p in curves[1]["curve"]]


@pytest.mark.parametrize(("budget", "expected"), [(1.3, 3), (1.05, 1), (2.5, 6), (5.0, 7), (1.01, None)])
@pytest.mark.parametrize("start", range(7))
def test_search_from_any_guess_finds_the_galloping_answer(budget, expected, start):
    calls: list[float] = []
    found = largest_passing_from(list(CURVE), start, curve_probe(budget, calls))
    assert (found.chosen.size if found.chosen else None) == expected
    assert calls[0] == start + 1 and len(calls) == len(set(calls))
    if expected is not None and start == min(expected, 6):  # the guess is just past the answer
        assert len(calls) <= 2


class CurveMeasure(PerplexityMeasure):
    """Ratio CURVE[k] for a model with k of `dense_layers` layers gone; the search's predictions (made
    inside the selection) read CURVE[k + bias] instead: a guess that is wrong by `bias` layers."""

    def __init__(self, bias: int, dense_layers: int = 8, stderr: float = 0.01) -> None:
        super().__init__(stream(), 16)
        self.bias, self.dense_layers, self.stderr, self.predicted = bias, dense_layers, stderr, []

    def dense(self, model):
        return {"ppl": 10.0, "segment_nll": [0.0] * 64}

    def ratio_against(self, model, dense, max_ratio):
        import inspect

        removed = self.dense_layers - len(find_layers(model).layers)
        predicting = any(frame.function == "predict" for frame in inspect.stack())  # the search's hook
        if predicting:
            self.predicted.append(removed)
        ratio = CURVE[min(max(removed + (self.bias if predicting else 0), 1), 7)]
        return PairedRatio(ratio=ratio, stderr=self.stderr, perplexity=10 * ratio, segments=16, complete=False)


@pytest.mark.parametrize(
    ("bias", "confirm_next", "probed", "trusted"),
    [
        # Default: probing starts at the predicted answer; a right prediction is confirmed by one probe
        # and the size past it is decided by its prediction, scaled by the error seen at the answer.
        (0, False, [3], [4]),
        (1, False, [2, 3, 4], []),  # the scaled prediction of 3 meets (1.35 x 1.1 / 1.22): probed
        (-1, False, [3, 4], []),
        (3, False, [1, 2, 3, 4, 5], []),  # the prediction missed at 1 where the probe met: never trusted
        (-3, False, [2, 3, 4, 5, 6], []),
        # confirm_next: every decision is an exact probe, starting just past the predicted answer.
        (0, True, [3, 4], []),
        (1, True, [3, 4], []),
        (-1, True, [3, 4, 5], []),
        (3, True, [1, 2, 3, 4, 5], []),
        (-3, True, [3, 4, 5, 6, 7], []),
    ],
)
def test_predicted_search_probes_from_the_selections_in_loop_state_and_keeps_the_exact_answer(
    bias, confirm_next, probed, trusted
):
    """GradMAP's in-loop state predicts each size's quality during the one selection run; exact
    probes start from the predicted answer. Wrong predictions cost probes, never the answer."""
    model, extra = make_tiny_llama(8), ids(n=16, seed=2)
    measure = CurveMeasure(bias)
    # CURVE: k = 3 is the largest within 1.3
    target = {"max_perplexity_ratio": 1.3, "max_sparsity": 0.9, "confirm_next": confirm_next}
    found = search(
        copy.deepcopy(model), ids(8), method="gradmap", target=target, measure=measure, compensation_data=extra
    )
    q = found.report["quality_target"]
    assert q["chosen_size"] == 3 and found.report["k"] == 3
    assert sorted(p["size"] for p in q["curve"] if p["exact"]) == probed and q["probes"] == len(probed)
    skipped = [p for p in q["curve"] if not p["exact"]]
    assert [p["size"] for p in skipped] == trusted and all(not p["meets"] and p["value"] > 1.3 for p in skipped)
    predicted = [p["size"] for p in q["predictions"]]
    assert predicted == measure.predicted == list(range(1, len(predicted) + 1))
    assert not q["predictions"][-1]["meets"] and all(p["meets"] for p in q["predictions"][:-1])
    # The hook and the extra in-loop fit at the last decision change no decision.
    single = prune(copy.deepcopy(model), ids(8), method="gradmap", target_sparsity=3 / 8, compensation_data=extra)
    assert q["removal_order"][:3] == single.report["removal_order"]
    assert found.report["removed_layers"] == single.report["removed_layers"]
    for name, weight in single.model.state_dict().items():
        assert torch.allclose(found.model.state_dict()[name], weight, atol=1e-6), name


def test_a_scaled_prediction_within_its_standard_error_of_the_budget_is_probed():
    """k = 4 reads 1.35 against a 1.3 budget, but with a 0.06 standard error: too close to trust."""
    model, extra = make_tiny_llama(8), ids(n=16, seed=2)
    target = {"max_perplexity_ratio": 1.3, "max_sparsity": 0.9}
    measure = CurveMeasure(0, stderr=0.06)
    found = search(model, ids(8), method="gradmap", target=target, measure=measure, compensation_data=extra)
    q = found.report["quality_target"]
    assert q["chosen_size"] == 3 and [(p["size"], p["exact"]) for p in q["curve"]] == [(3, True), (4, True)]


def test_search_without_predictions_gallops_up_from_one_layer():
    model, extra = make_tiny_llama(8), ids(n=16, seed=2)
    target = {"max_perplexity_ratio": 1.3, "max_sparsity": 0.9, "predict": False}
    measure = CurveMeasure(0)
    found = search(model, ids(8), method="gradmap", target=target, measure=measure, compensation_data=extra)
    q = found.report["quality_target"]
    assert q["chosen_size"] == 3 and [p["size"] for p in q["curve"]] == [1, 2, 3, 4]
    assert q["predictions"] == [] and measure.predicted == []
