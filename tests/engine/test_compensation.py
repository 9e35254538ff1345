"""Projection compensation: the solver, the merge, capture on real blocks, validation/rollback."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from workers.engine.compensation import (
    CompensationConfig,
    NormalEquations,
    OriginalWeights,
    apply_writer,
    capture_pruned,
    choose_placements,
    compensate,
    find_writer,
    fit_projection,
    measure_shift,
    merge_projection,
    ridge_projection,
    stream_placement,
    target_index,
)
from workers.engine.layers import remove_layers
from workers.engine.pipeline import prune


def _ids(n: int = 8, length: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _near_identity(d: int, seed: int = 0, scale: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(d) + scale * torch.randn(d, d, generator=g) / d**0.5


def test_ridge_recovers_exact_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    a = _near_identity(16)
    p = ridge_projection(x, x @ a, ridge=0.0)
    assert torch.allclose(p, a, atol=1e-4)
    # A strong ridge pulls the solution towards the identity.
    shrunk = ridge_projection(x, x @ a, ridge=100.0)
    assert (shrunk - torch.eye(16)).norm() < 0.1 * (a - torch.eye(16)).norm()


def test_post_norm_fit_is_refined_towards_exact(tiny_gemma3):
    block = tiny_gemma3.model.layers[0]
    _, post_norm, _ = find_writer(block)
    assert post_norm is not None  # Gemma's sandwich norm follows down_proj
    g = torch.Generator().manual_seed(1)
    z = torch.randn(256, 64, generator=g)
    residual = torch.randn(256, 64, generator=g)
    a = _near_identity(64, seed=2)
    with torch.no_grad():
        target = residual + apply_writer(z, a, post_norm)
        start = (residual + apply_writer(z, torch.eye(64), post_norm) - target).pow(2).mean()
        closed = fit_projection(z, residual, target, post_norm, ridge=0.0)
        closed_err = (residual + apply_writer(z, closed, post_norm) - target).pow(2).mean()
    refined = fit_projection(z, residual, target, post_norm, ridge=0.0, refine_steps=100, refine_lr=1e-3)
    with torch.no_grad():
        refined_err = (residual + apply_writer(z, refined, post_norm) - target).pow(2).mean()
    assert closed_err < 0.2 * start
    assert refined_err <= closed_err


def test_merge_projection_into_linear_is_exact():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16, bias=True)
    x = torch.randn(10, 32)
    p = _near_identity(16)
    expected = linear(x) @ p
    merge_projection(linear, p)
    assert torch.allclose(linear(x), expected, atol=1e-5)


def test_capture_fit_merge_recovers_exact_linear_drift(tiny_llama):
    """A drift that is exactly linear in the writer's output is removed exactly, through real blocks."""
    model = tiny_llama
    ids = _ids()
    keep = [0, 2, 3]
    position = 1  # kept layer 2, right after the removed layer 1
    z, residual = capture_pruned(model, keep, position, ids, 4, 10_000, lambda: None)
    a = _near_identity(64, seed=5)
    target = residual + z @ a  # what the block should output: an exact linear drift of its writer
    p = fit_projection(z, residual, target, None, ridge=0.0)
    assert torch.allclose(p, a, atol=1e-3)
    writer, _, _ = find_writer(model.model.layers[2])
    merge_projection(writer, p)
    z2, residual2 = capture_pruned(model, keep, position, ids, 4, 10_000, lambda: None)
    out = residual2 + z2
    assert torch.allclose(residual2, residual, atol=1e-4)
    assert (out - target).pow(2).mean() < 1e-8 * target.pow(2).mean() + 1e-8


def test_placements_and_targets():
    shifts = [
        {"position": p, "layer": layer, "shift": s, "abs_shift": s}
        for p, (layer, s) in enumerate(zip([0, 3, 4, 7], [0.0, 0.5, 0.2, 0.9], strict=True))
    ]
    keep = [0, 3, 4, 7]  # removed: 1-2 and 5-6, n = 8
    assert choose_placements(keep, 8, shifts, "after_cut", 4) == [1, 3]
    assert choose_placements(keep, 8, shifts, "before_cut", 4) == [0, 2]
    assert choose_placements(keep, 8, shifts, "around_cut", 4) == [0, 1, 2, 3]
    assert choose_placements([0, 1, 2, 3], 6, shifts, "around_cut", 4) == [3]  # trailing cut: only before
    assert choose_placements(keep, 8, shifts, "after_cut", 1) == [3]  # the larger relative shift
    assert choose_placements(keep, 8, shifts, "max_relative_shift", 1) == [3]
    assert target_index(keep, 1, 8) == 3  # after_cut: its own original output
    assert target_index(keep, 0, 8) == 2  # before_cut: absorbs removed 1-2
    assert target_index([0, 1], 1, 4) == 3  # trailing cut: the last original layer


def test_measure_shift_is_zero_before_first_cut(tiny_llama):
    rows = measure_shift(tiny_llama, [0, 1, 3], _ids(4), 2)
    assert [r["layer"] for r in rows] == [0, 1, 3]
    assert rows[0]["shift"] == 0.0 and rows[1]["shift"] == 0.0
    assert rows[2]["shift"] > 0.0 and rows[2]["hidden_norm"] > 0.0


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_compensate_reports_and_rolls_back(fixture, request):
    model = request.getfixturevalue(fixture)
    ids = _ids()
    keep = [0, 2, 3]
    reference = copy.deepcopy(model)
    remove_layers(reference, [1])
    plain = reference(input_ids=ids).logits

    config = CompensationConfig(min_improvement=0.99, refine_steps=5)  # impossible bar: must roll back
    report = compensate(model, keep, ids, config)
    json.dumps(report)
    assert report["kept"] is False
    assert report["layers"] == [] and report["tried_layers"] == [0, 2]  # around_cut: both sides of the cut
    assert not any(p["kept"] for p in report["projections"])
    assert report["mse_after"] < report["mse_before"]
    assert {"heldout_mse_before", "heldout_mse_after", "heldout_loss_before", "heldout_loss_after"} <= set(report)
    remove_layers(model, [1])
    assert torch.equal(model(input_ids=ids).logits, plain)  # weights restored bit for bit


def test_compensation_decision_follows_heldout_loss(tiny_llama):
    ids = _ids(8)
    report = compensate(tiny_llama, [0, 2, 3], ids, CompensationConfig())
    assert report["kept"] == (report["heldout_loss_after"] < report["heldout_loss_before"])
    assert report["kept"] == report["projections"][0]["kept"]
    assert report["fit_samples"] == 6 and report["heldout_samples"] == 2


def test_compensation_on_top_of_any_selector(tiny_llama):
    outcome = prune(tiny_llama, _ids(8), method="last_k", target_sparsity=0.25, options={"compensation": True})
    comp = outcome.report["compensation"]
    assert comp["enabled"] is True
    assert comp["tried_layers"] == [2]  # trailing cut: the last kept layer absorbs it
    assert "compensating" in outcome.report["timings"]


@pytest.mark.parametrize("refit", [True, False])
def test_kept_projection_is_refitted_on_all_calibration_rows(tiny_llama, refit):
    ids = _ids(8)
    config = CompensationConfig(placement="after_cut", min_improvement=-1.0, refit_on_all=refit)  # accept any fit
    report = compensate(copy.deepcopy(tiny_llama), [0, 2, 3], ids, config)
    entry = report["projections"][0]
    assert entry["kept"] is True
    if refit:
        assert entry["refit_on_all_rows"] == 8 * ids.shape[1] == entry["fit_tokens"] + 2 * ids.shape[1]
        assert entry["loss_after_refit"] == report["heldout_loss_after"]
    else:
        assert "refit_on_all_rows" not in entry and entry["loss_after"] == report["heldout_loss_after"]


def test_streamed_normal_equations_equal_the_in_memory_solve():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(700, 24, generator=g)
    t = x @ _near_identity(24, seed=6) + 0.3 * torch.randn(700, 24, generator=g)
    equations = NormalEquations(24)
    for start in range(0, 700, 64):  # uneven last chunk on purpose
        equations.add(x[start : start + 64], t[start : start + 64])
    for ridge in (0.0, 1.0):
        assert torch.allclose(equations.solve(ridge), ridge_projection(x, t, ridge), atol=1e-5)
    p = equations.solve(1.0)
    assert equations.mse(p) == pytest.approx(float((x @ p - t).pow(2).mean()), rel=1e-6)
    halves = NormalEquations(24)
    halves.add(x[:300], t[:300])
    rest = NormalEquations(24)
    rest.add(x[300:], t[300:])
    assert torch.allclose((halves + rest).solve(1.0), p, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_streaming_capture_equals_stacked_rows_through_real_blocks(fixture, request):
    """Micro-batch streaming on the real model gives the projection of stacking every row."""
    model = request.getfixturevalue(fixture)
    ids = _ids(6)
    keep, position, target_layer = [0, 2, 3], 1, 2
    _, post_norm, _ = find_writer(model.model.layers[2])
    originals = OriginalWeights([find_writer(model.model.layers[i])[0] for i in keep])
    streamed = stream_placement(model, keep, position, target_layer, ids, originals, 2, keep_rows=10**6)
    z, residual, target = streamed.rows
    z_all, residual_all = capture_pruned(model, keep, position, ids, 6, 10**6, lambda: None)
    assert torch.allclose(z, z_all, atol=1e-5) and torch.allclose(residual, residual_all, atol=1e-5)
    expected = fit_projection(z_all, residual_all, target, post_norm, ridge=1.0)
    assert torch.allclose(streamed.equations.solve(1.0), expected, atol=1e-4)
    assert streamed.equations.rows == ids.numel()


def test_original_targets_ignore_merged_projections(tiny_llama):
    """After a merge the original model's targets still come from the unmerged writer."""
    ids = _ids(4)
    keep = [0, 2, 3]
    writer, _, _ = find_writer(tiny_llama.model.layers[2])
    originals = OriginalWeights([writer])
    before = stream_placement(tiny_llama, keep, 2, 3, ids, originals, 2, keep_rows=10**6).rows[2]
    merge_projection(writer, _near_identity(64, seed=9, scale=1.0))
    after = stream_placement(tiny_llama, keep, 2, 3, ids, originals, 2, keep_rows=10**6).rows[2]
    assert torch.equal(before, after)


def test_compensation_data_is_its_own_budget(tiny_llama):
    calibration, extra = _ids(4), _ids(12, seed=8)
    options = {"compensation": True, "compensation_samples": 8}
    outcome = prune(
        copy.deepcopy(tiny_llama),
        calibration,
        method="last_k",
        target_sparsity=0.25,
        options=options,
        compensation_data=extra,
    )
    comp = outcome.report["compensation"]
    assert comp["source"] == "compensation_data"
    assert comp["fit_samples"] + comp["heldout_samples"] == 8
    assert comp["compensation_tokens"] == 8 * extra.shape[1]
    fallback = prune(copy.deepcopy(tiny_llama), calibration, method="last_k", target_sparsity=0.25, options=options)
    assert fallback.report["compensation"]["source"] == "calibration"
    assert fallback.report["compensation"]["compensation_tokens"] == calibration.numel()


def test_compensation_budget_for_the_source():
    from workers.engine.methods.layer_common import with_compensation_budget
    from workers.engine.registry import get_method, parse_options

    method = get_method("shortgpt")
    default = parse_options(method, {"compensation": True})
    assert with_compensation_budget(default, {}, "dataset").compensation_samples == 128
    assert with_compensation_budget(default, {}, "self_generated").compensation_samples == 32
    chosen = {"compensation": True, "compensation_samples": 8}
    assert with_compensation_budget(parse_options(method, chosen), chosen, "dataset").compensation_samples == 8
    width = parse_options(get_method("llm_pruner"), {})  # no compensation: left as it is
    assert with_compensation_budget(width, {}, "dataset") == width


def test_incremental_refit_equals_full_refit_upstream_of_the_new_cut():
    """After a second cut, refitting only its neighbours gives the projections a full refit gives
    for every layer up to the cut's far side (downstream ones keep their earlier fit by design)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.engine.methods.in_loop import cut_neighbours

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    ids = _ids(8)
    accept_all = CompensationConfig(min_improvement=-1.0)
    originals = OriginalWeights.of_model(model)
    compensate(model, [0, 1, 2, 4, 5], ids, accept_all, originals=originals)  # first cut: layer 3
    neighbours = cut_neighbours(6, [3, 1], 1)
    assert neighbours == [0, 2]
    originals.restore([find_writer(model.model.layers[i])[0] for i in neighbours])
    keep = [0, 2, 4, 5]
    incremental = compensate(model, keep, ids, accept_all, only_layers=neighbours, originals=originals)
    assert incremental["tried_layers"] == [0, 2] and incremental["layers"] == [0, 2]
    weights_inc = {i: find_writer(model.model.layers[i])[0].weight.detach().clone() for i in range(6)}
    originals.restore()
    full = compensate(model, keep, ids, accept_all, originals=originals)
    assert full["tried_layers"] == [0, 2, 4]
    for layer in (0, 2):
        assert torch.allclose(find_writer(model.model.layers[layer])[0].weight, weights_inc[layer], atol=1e-6)
    assert not torch.allclose(find_writer(model.model.layers[4])[0].weight, weights_inc[4], atol=1e-6)


def _six_layer(kind: str):
    """6-layer tiny LLaMA / Gemma-3 (sliding and full attention mixed), random weights."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shared = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shared)).eval()
    layer_types = ["sliding_attention", "full_attention"] * 3
    config = Gemma3TextConfig(**shared, head_dim=16, sliding_window=8, layer_types=layer_types)
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize(
    "kind,n,refit", [("llama", 10, True), ("gemma3", 10, True), ("llama", 10, False), ("gemma3", 1, True)]
)
def test_cached_targets_and_replayed_prefix_give_the_streamed_fit(kind, n, refit, monkeypatch):
    """One original pass for every placement's target and the pruned state replayed from placement
    to placement give the same projections, bit for bit, as re-running both prefixes per placement
    (the fallback past `target_cache_mib`)."""
    import workers.engine.compensation.fit as fit
    import workers.engine.compensation.streaming as streaming
    from workers.engine.hidden import lm_loss

    model = _six_layer(kind)
    ids = _ids(n)  # n=1: nothing held out, judged on the fit split; refit=False: held-out split only judged
    keep = [0, 2, 3, 5]  # two cuts: four placements, each merged (accept all) before the next
    results = []
    full_losses = []
    for budget in (1024.0, 0.0):
        copy_ = copy.deepcopy(model)
        with monkeypatch.context() as patch:
            if budget:  # the cached run must not re-run either prefix
                patch.setattr(streaming, "_pruned_rows", lambda *a: pytest.fail("pruned prefix re-run"))
                patch.setattr(streaming, "_original_rows", lambda *a: pytest.fail("original prefix re-run"))
                patch.setattr(fit, "lm_loss", lambda *a: full_losses.append(1) or lm_loss(*a))
            config = CompensationConfig(min_improvement=-1.0, target_cache_mib=budget, refit_on_all=refit)
            report = compensate(copy_, keep, ids, config)
        writers = [find_writer(copy_.model.layers[i])[0].weight.detach().clone() for i in keep]
        results.append((report, writers))
    (cached, w_cached), (streamed, w_streamed) = results
    assert cached["tried_layers"] == streamed["tried_layers"] == [0, 2, 3, 5]
    assert cached["layers"] == [0, 2, 3, 5]
    for a, b in zip(cached["projections"], streamed["projections"], strict=True):
        assert a["mse_before"] == b["mse_before"] and a["mse_after"] == b["mse_after"]
        assert a["loss_after"] == b["loss_after"] and a.get("loss_after_refit") == b.get("loss_after_refit")
    assert all(torch.equal(a, b) for a, b in zip(w_cached, w_streamed, strict=True))
    # Even the loss before any projection comes from the replayed state, and equals the full forward's.
    assert not full_losses
    judged = "heldout" if n > 1 else "fit"
    assert cached[f"{judged}_loss_before"] == streamed[f"{judged}_loss_before"]
    assert [p["loss_before"] for p in cached["projections"]] == [p["loss_before"] for p in streamed["projections"]]


def test_target_cache_budget():
    from workers.engine.compensation.streaming import target_cache_fits

    assert target_cache_fits(4096, 576, 8, 1024.0)  # SmolLM2, 32 x 128 tokens, 8 placements: 72 MiB
    assert not target_cache_fits(4096, 576, 8, 70.0)


def test_judging_windows_are_capped_so_larger_budgets_fit_more(tiny_llama):
    """A quarter of the windows judges each projection, at most `max_heldout_samples`; the rest fit it."""
    ids = _ids(48, length=16)
    keep = [0, 2, 3]
    capped = compensate(copy.deepcopy(tiny_llama), keep, ids, CompensationConfig())
    assert (capped["fit_samples"], capped["heldout_samples"]) == (40, 8)
    quarter = compensate(copy.deepcopy(tiny_llama), keep, ids, CompensationConfig(max_heldout_samples=100))
    assert (quarter["fit_samples"], quarter["heldout_samples"]) == (36, 12)
    small = compensate(copy.deepcopy(tiny_llama), keep, ids[:8], CompensationConfig())
    assert (small["fit_samples"], small["heldout_samples"]) == (6, 2)


def test_unjudged_compensation_keeps_every_fit_and_runs_no_held_out_forward(monkeypatch):
    """In-loop scaffolding skips the judge: the projections are exactly the judged run's (where it
    keeps them all), and no held-out loss (nor the held-out prefix) is ever computed."""
    import workers.engine.compensation.fit as fit
    from workers.engine.compensation.replay import PrefixReplay

    model = _six_layer("llama")
    ids = _ids(10)
    keep = [0, 2, 3, 5]
    judged_model = copy.deepcopy(model)
    judged = compensate(judged_model, keep, ids, CompensationConfig(min_improvement=-1.0, refit_on_all=False))
    replays: list[int] = []
    original_init = PrefixReplay.__init__

    def counting_init(self, model, keep, ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        replays.append(int(ids.shape[0]))
        original_init(self, model, keep, ids, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(PrefixReplay, "loss", lambda *a, **k: pytest.fail("an unjudged fit computed a loss"))
        patch.setattr(fit, "lm_loss", lambda *a, **k: pytest.fail("an unjudged fit computed a loss"))
        patch.setattr(PrefixReplay, "__init__", counting_init)
        unjudged = compensate(model, keep, ids, CompensationConfig(refit_on_all=False, judged=False))
    assert replays == [judged["fit_samples"]]  # the fit split only
    assert unjudged["layers"] == judged["layers"] == [0, 2, 3, 5]
    assert unjudged["judged_on"].startswith("not judged") and unjudged["heldout_loss_before"] is None
    for layer in keep:
        assert torch.equal(
            find_writer(model.model.layers[layer])[0].weight, find_writer(judged_model.model.layers[layer])[0].weight
        ), layer
