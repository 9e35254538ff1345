"""Generic decoder-layer removal, sparsity budgets and the simple layer baselines."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from workers.engine.layer_budget import achieved_sparsity, profile_config, profile_model, resolve_k
from workers.engine.layers import find_final_norm, find_layers, layer_subset, remove_layers
from workers.engine.pipeline import plan, prune
from workers.engine.types import EngineError

MODELS = ["tiny_llama", "tiny_gemma3"]


def _ids(n: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _skip_layers_reference(model, removed, ids):
    """Logits of the unpruned model with the removed blocks turned into identities (manual forward)."""
    reference = copy.deepcopy(model)
    layers = find_layers(reference).layers
    handles = [
        layers[i].register_forward_hook(
            lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True
        )
        for i in removed
    ]
    try:
        return _logits(reference, ids)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("fixture", MODELS)
def test_removing_nothing_keeps_logits(fixture, request):
    model = request.getfixturevalue(fixture)
    ids = _ids()
    before = _logits(model, ids)
    remove_layers(model, [])
    with layer_subset(model, range(4)):
        same = _logits(model, ids)
    assert torch.equal(before, _logits(model, ids))
    assert torch.equal(before, same)


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("removed", [[1], [0, 2], [3]])
def test_removal_matches_manual_skip(fixture, removed, request):
    model = request.getfixturevalue(fixture)
    ids = _ids()
    expected = _skip_layers_reference(model, removed, ids)
    full = _logits(model, ids)
    remove_layers(model, removed)
    got = _logits(model, ids)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)  # the removal really changed something


def test_gemma3_config_and_indices_follow_removal(tiny_gemma3):
    model = tiny_gemma3
    kept_blocks = [model.model.layers[i] for i in (0, 3)]
    remove_layers(model, [1, 2])
    assert model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert list(model.model.layers) == kept_blocks
    assert [block.self_attn.layer_idx for block in model.model.layers] == [0, 1]
    assert [block.self_attn.is_sliding for block in model.model.layers] == [True, False]
    assert isinstance(find_final_norm(model), torch.nn.Module)


def test_layer_subset_restores_everything(tiny_gemma3):
    model = tiny_gemma3
    ids = _ids()
    before = _logits(model, ids)
    types = list(model.config.layer_types)
    with layer_subset(model, [0, 3]):
        assert model.config.num_hidden_layers == 2
        assert len(model.model.layers) == 2
        assert model.model.layers[1].self_attn.layer_idx == 1
    assert model.config.num_hidden_layers == 4
    assert model.config.layer_types == types
    assert [block.self_attn.layer_idx for block in model.model.layers] == [0, 1, 2, 3]
    assert torch.equal(before, _logits(model, ids))


@pytest.mark.parametrize("fixture", MODELS)
def test_generate_with_kv_cache_after_removal(fixture, request):
    model = request.getfixturevalue(fixture)
    remove_layers(model, [1, 2])
    prompt = _ids(1, 12)
    cached = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)
    assert cached.shape == (1, 28)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("fixture", MODELS)
def test_save_load_round_trip(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    remove_layers(model, [0, 2])
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 2
    assert getattr(loaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    ids = _ids()
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-6)


def test_qwen2_sliding_window_boundary_is_kept():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=3,
    )
    model = Qwen2ForCausalLM(config).eval()
    types = list(model.config.layer_types)
    remove_layers(model, [1, 4])
    assert model.config.max_window_layers == 2  # kept layers 0, 2 were below the old boundary 3
    assert model.config.layer_types == [types[i] for i in (0, 2, 3, 5)]
    assert model.generate(_ids(1, 6), max_new_tokens=4, do_sample=False).shape == (1, 10)


def test_budget_layers_and_parameters_bases(tiny_llama):
    profile = profile_model(tiny_llama)
    assert resolve_k(profile, 0.5, "layers") == 2
    assert resolve_k(profile, 0.3, "layers") == 1  # round(1.2)
    assert resolve_k(profile, 0.375, "layers") == 2  # round half up: 1.5 -> 2
    per_layer = profile.per_layer[0]
    target = 2 * per_layer / profile.total
    assert resolve_k(profile, target, "parameters") == 2
    achieved = achieved_sparsity(profile, [1, 3])
    assert achieved["layers"] == 0.5
    assert achieved["parameters"] == pytest.approx(2 * per_layer / profile.total)
    assert achieved["parameters_without_embeddings"] > achieved["parameters"]
    for bad in (0.05, 0.95):
        with pytest.raises(EngineError) as err:
            resolve_k(profile, bad, "layers")
        assert err.value.code == "invalid_sparsity"


def test_config_profile_matches_live_model(tiny_gemma3):
    assert profile_config(tiny_gemma3.config) == profile_model(tiny_gemma3)


def test_plan_is_cheap_and_exact_for_last_k(tiny_llama):
    result = plan(tiny_llama.config, method="last_k", target_sparsity=0.5)
    assert result["removed_layers"] == [2, 3]
    assert result["layers_after"] == 2
    assert result["parameters_after"]["total"] < result["parameters_before"]["total"]
    data_dependent = plan(tiny_llama.config, method="shortgpt", target_sparsity=0.25, sparsity_basis="layers")
    assert data_dependent["k"] == 1 and data_dependent["removed_layers"] is None


@pytest.mark.parametrize("method", ["last_k", "shortgpt"])
def test_simple_methods_through_pipeline(tiny_llama, method):
    stages = []
    outcome = prune(
        tiny_llama,
        _ids(4, 16),
        method=method,
        target_sparsity=0.5,
        progress=lambda stage, fraction, message: stages.append(stage),
    )
    report = outcome.report
    json.dumps(report)  # JSON-serialisable only
    assert report["layers_before"] == 4 and report["layers_after"] == 2
    assert len(find_layers(outcome.model).layers) == 2
    assert report["achieved_layer_sparsity"] == 0.5
    assert len(report["decisions"]) == 2
    assert all(str(d["chosen"]) in d["scores"] for d in report["decisions"])
    assert sorted(d["chosen"] for d in report["decisions"]) == report["removed_layers"]
    assert len(report["mean_shift"]) == 2
    assert {"scoring", "pruning"} <= set(stages)
    if method == "last_k":
        assert report["removed_layers"] == [2, 3]


def test_shortgpt_removes_lowest_block_influence(tiny_llama):
    # Make layer 2 an identity (zero writers): its block influence is 0, so it must go first.
    block = tiny_llama.model.layers[2]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    outcome = prune(tiny_llama, _ids(4, 16), method="shortgpt", target_sparsity=0.25)
    assert outcome.report["removed_layers"] == [2]
    assert outcome.report["decisions"][0]["scores"]["2"] == pytest.approx(0.0, abs=1e-6)


def test_cancel_stops_a_method(tiny_llama):
    from workers.engine.types import JobCancelled

    with pytest.raises(JobCancelled):
        prune(tiny_llama, _ids(4, 16), method="shortgpt", target_sparsity=0.5, should_cancel=lambda: True)
