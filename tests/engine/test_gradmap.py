"""GradMAP and the gradient/greedy baselines: scoring behaviour, pass counts, grads, report."""

from __future__ import annotations

import copy
import json
import math

import pydantic
import pytest
import torch

from workers.engine.layers import find_layers
from workers.engine.methods.gradient_scores import RESIDUAL_SCORES, residual_scores, weight_scores
from workers.engine.pipeline import plan, prune
from workers.engine.registry import all_methods, get_method, parse_options

LAYER_METHODS = ["gradmap", "shortgpt", "sleb", "taylor_plus", "random", "last_k"]


def _ids(n: int = 4, length: int = 16, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _make_identity(model, index: int) -> None:
    """Zero a block's residual writers: it becomes an exact identity on the residual stream."""
    block = find_layers(model).layers[index]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def _count_backwards(model) -> list[int]:
    """Count backward passes through the whole network (a hook on the first block's input grads)."""
    calls = [0]
    first = find_layers(model).layers[0]
    first.register_full_backward_hook(lambda module, grad_in, grad_out: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_all_layer_methods_registered_with_compensation_option():
    methods = all_methods()
    for name in LAYER_METHODS:
        assert name in methods and methods[name].kind == "layer"
        options = parse_options(methods[name], {})
        assert options.compensation is (name == "gradmap")
        assert parse_options(methods[name], {"compensation": name != "gradmap"}).compensation is (name != "gradmap")
    with pytest.raises(pydantic.ValidationError):
        parse_options(get_method("gradmap"), {"no_such_option": 1})
    with pytest.raises(pydantic.ValidationError):
        parse_options(get_method("gradmap"), {"score": "magic"})


@pytest.mark.parametrize("micro_batch_size,expected_calls", [(4, 1), (2, 2)])
def test_one_backward_pass_per_decision(tiny_llama, micro_batch_size, expected_calls):
    calls = _count_backwards(tiny_llama)
    outcome = prune(
        tiny_llama,
        _ids(4),
        method="gradmap",
        target_sparsity=0.5,
        options={"compensation": False, "micro_batch_size": micro_batch_size},
    )
    report = outcome.report
    assert report["backward_passes"] == 2 == len(report["decisions"])
    # One backward of the whole calibration batch per decision (split into micro-batches).
    assert calls[0] == 2 * expected_calls == report["backward_calls"]


def test_residual_score_of_identity_layer_is_zero_and_removed_first(tiny_llama):
    _make_identity(tiny_llama, 2)
    scores = residual_scores(tiny_llama, _ids(), "residual", 4)
    assert scores[2] == 0.0 and min(scores[i] for i in (0, 1, 3)) > 0.0
    outcome = prune(
        tiny_llama, _ids(), method="gradmap", target_sparsity=0.25, options={"compensation": False, "score": "residual"}
    )
    assert outcome.report["removed_layers"] == [2]


@pytest.mark.parametrize("kind", RESIDUAL_SCORES)
def test_every_residual_score_sees_an_identity_layer_as_free(tiny_llama, kind):
    _make_identity(tiny_llama, 1)
    scores = residual_scores(tiny_llama, _ids(), kind, 2)
    assert scores[1] == pytest.approx(0.0, abs=1e-6)
    if kind != "residual_signed":  # the only signed score: others may go below zero
        assert min(scores[i] for i in (0, 2, 3)) > 1e-6


def test_lookahead_sees_an_identity_layer_as_free_and_reranks_by_loss(tiny_llama):
    from workers.engine.hidden import lm_loss

    _make_identity(tiny_llama, 1)
    ids = _ids()
    full_loss = lm_loss(tiny_llama, ids, 4)
    untouched = copy.deepcopy(tiny_llama)
    outcome = prune(
        tiny_llama, ids, method="gradmap", target_sparsity=0.5, options={"compensation": False, "lookahead": 4}
    )
    report = outcome.report
    first, second = report["decisions"]
    assert set(first["lookahead_losses"]) == {"0", "1", "2", "3"}  # every candidate re-scored
    assert first["lookahead_losses"]["1"] == pytest.approx(full_loss, abs=1e-6)  # identity: no loss change
    for decision in (first, second):  # the exact loss decides, not the score
        losses = decision["lookahead_losses"]
        assert decision["chosen"] == int(min(losses, key=lambda k: (losses[k], int(k))))
    assert report["lookahead_forwards"] == 4 + 3 and report["forward_passes"] == 2 + 7
    plain = prune(untouched, ids, method="gradmap", target_sparsity=0.5, options={"compensation": False})
    assert "lookahead_losses" not in plain.report["decisions"][0] and plain.report["forward_passes"] == 2


def test_iterative_decisions_rescore_the_smaller_model(tiny_llama):
    outcome = prune(tiny_llama, _ids(), method="gradmap", target_sparsity=0.5, options={"compensation": False})
    first, second = outcome.report["decisions"]
    assert len(first["scores"]) == 4 and len(second["scores"]) == 3
    assert str(first["chosen"]) not in second["scores"]
    # Re-scoring happened: a surviving layer's score changed after the first removal.
    survivors = [layer for layer in second["scores"]]
    assert any(not math.isclose(first["scores"][s], second["scores"][s]) for s in survivors)
    assert sorted([first["chosen"], second["chosen"]]) == outcome.report["removed_layers"]


def test_in_loop_compensation_fits_between_decisions_and_restores_weights(tiny_llama):
    original = {name: p.detach().clone() for name, p in tiny_llama.named_parameters()}
    outcome = prune(
        tiny_llama,
        _ids(8),
        method="gradmap",
        target_sparsity=0.5,
        options={"compensation": False, "compensate_in_loop": True, "compensation_ridge": 0.01},
    )
    first, second = outcome.report["decisions"]
    assert "in_loop_compensation" in first and "in_loop_compensation" not in second  # none after the last
    assert outcome.report["backward_passes"] == 2
    # The in-loop projections are scaffolding for the selection only: the weights come back untouched.
    removed = set(outcome.report["removed_layers"])
    kept = [i for i in range(4) if i not in removed]
    for position, index in enumerate(kept):
        for name, p in find_layers(outcome.model).layers[position].named_parameters():
            assert torch.equal(p, original[f"model.layers.{index}.{name}"]), (index, name)


def test_no_gradients_on_embeddings_or_head_and_flags_restored(tiny_llama):
    seen = []
    embedding = tiny_llama.get_input_embeddings()
    head = tiny_llama.get_output_embeddings()
    embedding.register_forward_hook(
        lambda module, args, out: seen.append((embedding.weight.requires_grad, head.weight.requires_grad))
    )
    ids = _ids()
    residual_scores(tiny_llama, ids, "residual_signed", 2)
    weight_scores(tiny_llama, ids, "taylor", 2)
    assert seen and not any(emb or lm for emb, lm in seen)
    assert all(p.requires_grad for p in tiny_llama.parameters())  # restored
    assert all(p.grad is None for p in tiny_llama.parameters())  # nothing left behind


def test_weight_scores_only_need_block_gradients(tiny_llama):
    scores = weight_scores(tiny_llama, _ids(), "grad_mean", 4)
    assert len(scores) == 4 and all(s > 0 for s in scores)


def test_protected_layers_are_never_removed(tiny_llama):
    outcome = prune(
        tiny_llama,
        _ids(),
        method="gradmap",
        target_sparsity=0.5,
        options={"compensation": False, "protect_first": 1, "protect_last": 1},
    )
    assert outcome.report["removed_layers"] == [1, 2]
    assert all(set(d["scores"]) <= {"1", "2"} for d in outcome.report["decisions"])


def test_sleb_removes_the_layer_whose_absence_hurts_least(tiny_llama):
    _make_identity(tiny_llama, 1)
    outcome = prune(tiny_llama, _ids(), method="sleb", target_sparsity=0.25)
    report = outcome.report
    assert report["removed_layers"] == [1]
    assert report["forward_passes"] == 4  # one candidate evaluation per remaining layer


def test_random_is_seeded(tiny_llama):
    import copy

    other = copy.deepcopy(tiny_llama)
    a = prune(tiny_llama, _ids(), method="random", target_sparsity=0.5, seed=7).report["removed_layers"]
    b = prune(other, _ids(), method="random", target_sparsity=0.5, seed=7).report["removed_layers"]
    assert a == b and len(a) == 2


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_every_method_on_gemma3_with_compensation(tiny_gemma3, method):
    stages = []
    outcome = prune(
        tiny_gemma3,
        _ids(6),
        method=method,
        target_sparsity=0.5,
        sparsity_basis="layers",
        options={"compensation": True},
        progress=lambda stage, f, m: stages.append(stage),
    )
    report = outcome.report
    json.dumps(report)
    assert report["layers_after"] == 2 == outcome.model.config.num_hidden_layers
    assert len(outcome.model.config.layer_types) == 2
    assert report["compensation"]["enabled"] is True and "kept" in report["compensation"]
    assert {"scoring", "pruning", "compensating"} <= set(stages)
    assert set(report["timings"]) >= {"scoring", "analysis", "compensating", "pruning"}
    assert outcome.model.generate(_ids(1, 4), max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_parameters_basis_through_pipeline(tiny_llama):
    outcome = prune(
        tiny_llama,
        _ids(),
        method="gradmap",
        target_sparsity=0.3,
        sparsity_basis="parameters",
        options={"compensation": False},
    )
    report = outcome.report
    per_layer = sum(p.numel() for p in find_layers(outcome.model).layers[0].parameters())
    # k = round(0.3 * total / per_layer)
    assert report["k"] == math.floor(0.3 * report["parameters_before"]["total"] / per_layer + 0.5)
    assert report["achieved_sparsity"]["parameters"] == pytest.approx(report["achieved_parameter_sparsity"])


def test_gradmap_plan_is_data_free(tiny_llama):
    result = plan(tiny_llama.config, method="gradmap", target_sparsity=0.5)
    assert result["k"] == 2 and result["removed_layers"] is None and result["compensation"] is True


@pytest.mark.slow
def test_gradmap_on_smollm2(smollm2, wikitext_text):
    from workers.engine.calibration import token_batches
    from workers.engine.hidden import lm_loss

    model, tokenizer = smollm2
    calibration = token_batches(tokenizer, [wikitext_text[:200_000]], n_samples=4, seq_len=64, seed=0)
    heldout = token_batches(tokenizer, [wikitext_text[200_000:400_000]], n_samples=4, seq_len=64, seed=1)
    dense_loss = lm_loss(model, heldout)
    outcome = prune(model, calibration, method="gradmap", target_sparsity=0.1)
    report = outcome.report
    json.dumps(report)
    assert report["layers_before"] == 30 and report["layers_after"] == 27
    assert len(find_layers(outcome.model).layers) == 27 and outcome.model.config.num_hidden_layers == 27
    assert len(report["removed_layers"]) == 3 and report["backward_passes"] == 3
    assert len(report["decisions"]) == 3 and len(report["mean_shift"]) == 27
    comp = report["compensation"]
    assert comp["enabled"] and comp["mse_after"] < comp["mse_before"]
    assert "heldout_loss_before" in comp and len(comp["tried_layers"]) >= 1
    # On text not used for calibration: damaged, but still a language model.
    pruned_loss = lm_loss(outcome.model, heldout)
    assert math.isfinite(pruned_loss) and dense_loss - 0.5 < pruned_loss < dense_loss + 3.0
    assert report["pruning_seconds"] > 0 and report["peak_memory"]["peak_rss_mib"] > 0


def _six_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def test_in_loop_targets_captured_once_give_the_streamed_selection(monkeypatch):
    """In-loop compensation captures the original model's targets once for all decisions; the
    selection (choices and every score) equals the one that re-runs the original per fit."""
    import workers.engine.compensation.fit as compensation_fit
    import workers.engine.compensation.streaming as streaming

    model = _six_layers()
    windows = _ids(12)
    options = {"compensation": False, "compensate_in_loop": True, "in_loop_samples": 8}
    runs = []
    original_rows = streaming._original_rows
    for cache in (True, False):
        calls = []
        with monkeypatch.context() as patch:
            patch.setattr(streaming, "_original_rows", lambda *a, calls=calls: calls.append(1) or original_rows(*a))
            if not cache:  # as if over the cache budget: every fit re-runs the original prefix
                patch.setattr(compensation_fit, "target_cache_fits", lambda *a: False)
            outcome = prune(
                copy.deepcopy(model),
                _ids(4),
                method="gradmap",
                target_sparsity=0.5,
                options=options,
                compensation_data=windows,
            )
        assert outcome.report["in_loop_tokens"] == windows[:8].numel()  # the first in_loop_samples windows
        runs.append((outcome.report["decisions"], len(calls)))
    (cached, cached_calls), (streamed, streamed_calls) = runs
    assert cached_calls == 0 and streamed_calls > 0
    assert [d["chosen"] for d in cached] == [d["chosen"] for d in streamed]
    assert [d["scores"] for d in cached] == [d["scores"] for d in streamed]
    assert [d.get("in_loop_compensation") for d in cached] == [d.get("in_loop_compensation") for d in streamed]


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("judged", [False, True])
def test_in_loop_states_kept_across_decisions_give_the_selection_of_fresh_replays(kind, judged, monkeypatch):
    """In-loop fits resume the pruned prefix from states kept since earlier decisions; every score,
    choice and fitted projection equals the run whose every fit re-runs the prefix from the embeddings."""
    from tests.conftest import make_tiny_gemma3, make_tiny_llama
    from workers.engine.methods.in_loop import InLoopCompensation

    model = make_tiny_llama(8) if kind == "llama" else make_tiny_gemma3(8)
    options = {"compensation": False, "compensate_in_loop": True, "in_loop_samples": 10, "in_loop_judged": judged}
    starts: list[int] = []
    replay = InLoopCompensation._replay

    def counting(self, keep, first, last):  # type: ignore[no-untyped-def]
        built = replay(self, keep, first, last)
        starts.append(built.position)
        return built

    runs = []
    for reuse in (True, False):
        with monkeypatch.context() as patch:
            patch.setattr(InLoopCompensation, "_replay", counting)
            if not reuse:  # every fit builds its replay with a forward from the embeddings
                patch.setattr(InLoopCompensation, "_forget_after", lambda self, layer: self._states.clear())
                patch.setattr(InLoopCompensation, "_replay", None)
            outcome = prune(
                copy.deepcopy(model),
                _ids(4),
                method="gradmap",
                target_sparsity=5 / 8,
                options=options,
                compensation_data=_ids(12, seed=5),
            )
        runs.append(outcome.report["decisions"])
    reused, fresh = runs
    assert len(reused) == 5 and any(position > 0 for position in starts)  # some fit resumed mid-model
    assert [d["chosen"] for d in reused] == [d["chosen"] for d in fresh]
    assert [d["scores"] for d in reused] == [d["scores"] for d in fresh]  # bit for bit
    assert [d["in_loop_compensation"] for d in reused[:-1]] == [d["in_loop_compensation"] for d in fresh[:-1]]
