"""LLM-Pruner width pruning on tiny random models: groups, targets, slicing, artifacts, options."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.engine.pipeline import plan, prune
from workers.engine.registry import get_method, parse_options
from workers.engine.types import EngineError, JobCancelled
from workers.engine.width.groups import decoder_layers, head_rows, model_geometry
from workers.engine.width.importance import LayerScores
from workers.engine.width.plan import resolve_layer_range, widths_at
from workers.engine.width.prune import prune_block

ALL_LAYERS = {"layer_start": 0, "layer_end": 4}


def calib(n: int = 4, seq: int = 24, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def run(model, target: float = 0.2, **options):
    return prune(
        model, calib(), method="llm_pruner", target_sparsity=target, sparsity_basis="parameters", options=options
    )


def wide_gqa_llama():
    """8 query heads over 4 KV heads (n_rep=2), so a KV group is one of four."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def test_uniform_pruning_updates_shapes_and_config_and_reloads_plain(tiny_llama, tmp_path):
    outcome = run(tiny_llama, 0.25, **ALL_LAYERS)
    model, report = outcome.model, outcome.report
    cfg = model.config
    assert report["artifact_format"] == "uniform"
    assert report["loading"] == "AutoModelForCausalLM.from_pretrained(path)"
    assert cfg.num_attention_heads == 2 and cfg.num_key_value_heads == 1  # one of two KV groups removed
    assert cfg.head_dim == 16 and cfg.intermediate_size < 128
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (2 * 16, 64) and attn.o_proj.weight.shape == (64, 2 * 16)
        assert attn.k_proj.weight.shape == (16, 64) and attn.v_proj.out_features == 16
        assert attn.num_key_value_groups == 2
        assert mlp.gate_proj.weight.shape == (cfg.intermediate_size, 64)
        assert mlp.down_proj.weight.shape == (64, cfg.intermediate_size)
    ids = calib(2, 16, seed=5)
    expected = logits(model, ids)
    outcome.save_model(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in saved and saved["head_dim"] == 16
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no custom code
    assert torch.equal(logits(reloaded, ids), expected)


def test_per_layer_artifact_reloads_identically_only_with_its_loader(tiny_llama, tmp_path):
    outcome = run(tiny_llama, 0.15, layer_start=1, layer_end=3)
    report = outcome.report
    assert report["artifact_format"] == "per_layer"
    assert "trust_remote_code=True" in report["loading"]
    widths = [(w["num_attention_heads"], w["intermediate_size"]) for w in report["layer_widths"]]
    assert widths[0] == widths[3] == (4, 128) and widths[1] == widths[2] != (4, 128)
    ids = calib(2, 16, seed=6)
    expected = logits(outcome.model, ids)
    outcome.save_model(tmp_path)
    assert (tmp_path / "modeling_slimforge_width.py").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))  # never a pickle
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["slimforge_layer_widths"]["intermediate_size"][0] == 128
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert torch.equal(logits(reloaded, ids), expected)
    with pytest.raises(Exception):  # noqa: B017 - plain loading must not silently load wrong shapes
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)


def test_ratio_zero_leaves_logits_unchanged(tiny_llama):
    ids = calib(2, 16, seed=7)
    before = logits(tiny_llama, ids)
    geoms = model_geometry(tiny_llama)
    widths = widths_at(geoms, [0, 1, 2, 3], 0.0, 0.0, prune_kv_heads=True, channel_multiple=1)
    for g, w, layer in zip(geoms, widths, decoder_layers(tiny_llama), strict=True):
        scores = LayerScores(attention=torch.rand(g.num_kv_heads), mlp=torch.rand(g.intermediate_size))
        removed = prune_block(layer, g, scores, w, prune_kv_heads=True)
        assert removed == {"query_heads": [], "kv_heads": [], "channels": []}
    assert torch.equal(logits(tiny_llama, ids), before)


@pytest.mark.parametrize("target", [0.05, 0.2, 0.35])
@pytest.mark.parametrize("prune_kv_heads", [True, False])
def test_parameter_target_met_within_one_percent(tiny_llama, target, prune_kv_heads):
    outcome = run(tiny_llama, target, prune_kv_heads=prune_kv_heads, **ALL_LAYERS)
    report = outcome.report
    assert abs(report["achieved_parameter_sparsity"] - target) <= 0.01
    # The plan's exact count matches the real model's count.
    removed = report["parameters_before"]["total"] - report["parameters_after"]["total"]
    assert removed == report["planned_removed_parameters"]


def test_plan_from_config_matches_run(tiny_llama):
    options = {"layer_start": 1, "layer_end": 3, "channel_multiple": 4}
    dry = plan(
        tiny_llama.config, method="llm_pruner", target_sparsity=0.2, sparsity_basis="parameters", options=options
    )
    outcome = run(tiny_llama, 0.2, **options)
    assert dry["layer_widths"] == outcome.report["layer_widths"]
    assert dry["parameters_after"] == outcome.report["parameters_after"]
    assert all(w["intermediate_size"] % 4 == 0 for w in dry["layer_widths"])


@pytest.mark.parametrize("importance", ["element1", "element2", "vector", "l2"])
def test_useless_kv_group_is_the_one_pruned(importance):
    model = wide_gqa_llama()
    useless = {0: 2, 1: 0, 2: 3}  # layer -> KV group whose weights are zeroed
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(model)):
            attn, g = layer.self_attn, useless[i]
            kv_rows = head_rows([g], 8)
            q_rows = head_rows([2 * g, 2 * g + 1], 8)  # repeat_kv pairs KV head g with query heads 2g, 2g+1
            attn.q_proj.weight[q_rows] = 0
            attn.k_proj.weight[kv_rows] = 0
            attn.v_proj.weight[kv_rows] = 0
            attn.o_proj.weight[:, q_rows] = 0
    ids = calib(2, 16, seed=8)
    before = logits(model, ids)
    geom = model_geometry(model)[0]
    n_layers = 3
    # A target of exactly one KV group per layer, attention only.
    total = sum(p.numel() for p in model.parameters())
    target = geom.kv_group_params * n_layers / total
    outcome = run(model, target, importance=importance, prune_mlp=False, layer_start=0, layer_end=3)
    for i, g in useless.items():
        assert outcome.report["removed_groups"][str(i)]["kv_heads"] == [g]
        assert outcome.report["removed_groups"][str(i)]["query_heads"] == [2 * g, 2 * g + 1]
    # The removed group contributed nothing, so the output is unchanged.
    torch.testing.assert_close(logits(outcome.model, ids), before, rtol=1e-5, atol=1e-5)


def test_query_heads_pruned_uniformly_within_kv_groups(tiny_llama):
    # tiny_llama: 4 query heads over 2 KV heads; zero query head 1 (group 0) and 2 (group 1) everywhere.
    with torch.no_grad():
        for layer in decoder_layers(tiny_llama):
            rows = head_rows([1, 2], 16)
            layer.self_attn.q_proj.weight[rows] = 0
            layer.self_attn.o_proj.weight[:, rows] = 0
    ids = calib(2, 16, seed=9)
    before = logits(tiny_llama, ids)
    geom = model_geometry(tiny_llama)[0]
    total = sum(p.numel() for p in tiny_llama.parameters())
    target = 2 * geom.query_head_params * 4 / total
    outcome = run(tiny_llama, target, prune_kv_heads=False, prune_mlp=False, **ALL_LAYERS)
    cfg = outcome.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 2)
    for i in range(4):
        assert outcome.report["removed_groups"][str(i)]["query_heads"] == [1, 2]
        assert outcome.report["removed_groups"][str(i)]["kv_heads"] == []
    torch.testing.assert_close(logits(outcome.model, ids), before, rtol=1e-5, atol=1e-5)


def test_useless_mlp_channels_are_pruned(tiny_llama):
    dead = torch.arange(0, 128, 4)  # 32 of 128 channels in every block
    with torch.no_grad():
        for layer in decoder_layers(tiny_llama):
            layer.mlp.gate_proj.weight[dead] = 0
            layer.mlp.up_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[:, dead] = 0
    ids = calib(2, 16, seed=10)
    before = logits(tiny_llama, ids)
    total = sum(p.numel() for p in tiny_llama.parameters())
    target = 32 * 3 * 64 * 4 / total
    outcome = run(tiny_llama, target, prune_attention=False, **ALL_LAYERS)
    assert outcome.model.config.intermediate_size == 96
    for i in range(4):
        assert outcome.report["removed_groups"][str(i)]["channels"] == dead.tolist()
    torch.testing.assert_close(logits(outcome.model, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("importance", ["element1", "element2", "vector", "l2", "random"])
@pytest.mark.parametrize("aggregation", ["sum", "max", "prod", "last"])
def test_every_importance_and_aggregation_runs(tiny_llama, importance, aggregation):
    outcome = run(tiny_llama, 0.2, importance=importance, aggregation=aggregation, **ALL_LAYERS)
    assert abs(outcome.report["achieved_parameter_sparsity"] - 0.2) <= 0.01
    assert torch.isfinite(logits(outcome.model, calib(1, 8))).all()


def test_importance_changes_the_choice(tiny_llama):
    chosen = {}
    for importance in ("element1", "random"):
        model = copy.deepcopy(tiny_llama)  # the config too: pruning rewrites it in place
        chosen[importance] = run(model, 0.2, importance=importance, **ALL_LAYERS).report["removed_groups"]
    assert chosen["element1"] != chosen["random"]


def test_default_layer_range_skips_first_four_and_last_two():
    assert resolve_layer_range(30, None, None) == list(range(4, 28))
    assert resolve_layer_range(4, None, None) == [0, 1, 2, 3]  # shallow models: everything
    assert resolve_layer_range(30, 2, -1) == list(range(2, 29))
    with pytest.raises(EngineError):
        resolve_layer_range(4, 3, 3)


def test_layers_basis_is_rejected(tiny_llama):
    with pytest.raises(EngineError) as err:
        prune(tiny_llama, calib(), method="llm_pruner", target_sparsity=0.2, sparsity_basis="layers")
    assert err.value.code == "unsupported_basis" and "parameters" in err.value.message


def test_unreachable_target_and_forbidden_per_layer_widths(tiny_llama):
    with pytest.raises(EngineError) as err:
        run(tiny_llama, 0.9, layer_start=1, layer_end=2)
    assert err.value.code == "target_unreachable"
    with pytest.raises(EngineError) as err:
        run(tiny_llama, 0.1, layer_start=1, layer_end=3, allow_per_layer_widths=False)
    assert err.value.code == "per_layer_widths_not_allowed"


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(EngineError) as err:
        run(model, 0.2)
    assert err.value.code == "unsupported_architecture" and "gpt2" in err.value.message


def test_options_are_validated():
    method = get_method("llm_pruner")
    assert method.kind == "width"
    with pytest.raises(ValueError):
        parse_options(method, {"importance": "taylor"})
    with pytest.raises(ValueError):
        parse_options(method, {"channel_multiple": 0})
    with pytest.raises(ValueError):
        parse_options(method, {"layer_start": 5, "layer_end": 3})
    with pytest.raises(ValueError):
        parse_options(method, {"no_such_option": 1})


def test_progress_stages_and_cancel(tiny_llama):
    stages = []
    prune(
        tiny_llama,
        calib(),
        method="llm_pruner",
        target_sparsity=0.2,
        sparsity_basis="parameters",
        options=ALL_LAYERS,
        progress=lambda s, f, m: stages.append(s),
    )
    assert stages.index("scoring") < stages.index("pruning")

    calls = iter(range(100))
    with pytest.raises(JobCancelled):
        prune(
            tiny_llama,
            calib(),
            method="llm_pruner",
            target_sparsity=0.2,
            sparsity_basis="parameters",
            options=ALL_LAYERS,
            should_cancel=lambda: next(calls) >= 1,
        )


def test_lora_recovery_trains_merges_and_lowers_loss(tiny_llama, tmp_path):
    data = calib(4, 32, seed=3)
    outcome = prune(
        tiny_llama,
        calib(),
        method="llm_pruner",
        target_sparsity=0.2,
        sparsity_basis="parameters",
        options={
            **ALL_LAYERS,
            "recovery": True,
            "recovery_steps": 12,
            "recovery_lr": 5e-3,
            "lora_r": 4,
            "recovery_batch_size": 4,
            "lora_dropout": 0.0,
        },
        recovery_data=data,
    )
    rec = outcome.report["recovery"]
    assert rec["data"] == "recovery_data" and len(rec["loss_curve"]) == 12
    assert rec["loss_curve"][-1] < rec["loss_curve"][0]
    model = outcome.model
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged, no peft left
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = calib(2, 16, seed=4)
    expected = logits(model, ids)
    outcome.save_model(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, ids), expected)


def test_pruning_a_per_layer_artifact_again(tiny_llama, tmp_path):
    first = run(tiny_llama, 0.1, layer_start=1, layer_end=3)
    first.save_model(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True).eval()
    second = run(loaded, 0.1, layer_start=0, layer_end=2)
    widths = [w["intermediate_size"] for w in second.report["layer_widths"]]
    assert widths[0] < 128 and widths[1] < widths[2] and widths[3] == 128  # layer 1 pruned twice
    ids = calib(2, 16, seed=11)
    expected = logits(second.model, ids)
    second.save_model(tmp_path / "b")
    source = (tmp_path / "b" / "modeling_slimforge_width.py").read_text()
    assert "from transformers.models.llama.modeling_llama import LlamaForCausalLM" in source
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b", trust_remote_code=True).eval()
    assert torch.equal(logits(reloaded, ids), expected)


def test_cached_generation_matches_uncached_with_per_layer_widths(tiny_llama):
    model = run(tiny_llama, 0.15, layer_start=1, layer_end=3).model
    prompt = calib(1, 8, seed=12)
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    seq = prompt
    for _ in range(6):  # greedy without a KV cache
        nxt = logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)


def test_gradient_and_fisher_match_per_sample_autograd(tiny_llama):
    from workers.engine.width.importance import collect_gradients, layer_scores, target_linears

    data = calib(3, 16, seed=13)
    linears = target_linears(tiny_llama, [1])
    stats = collect_gradients(tiny_llama, data, linears, batch_size=2, fisher=True, on_step=lambda *a: None)
    down = decoder_layers(tiny_llama)[1].mlp.down_proj
    per_sample = []
    for row in data:
        tiny_llama.zero_grad()
        tiny_llama(input_ids=row[None], labels=row[None]).loss.backward()
        per_sample.append(down.weight.grad.clone())
    tiny_llama.zero_grad()
    grads = torch.stack(per_sample)
    s = stats[(1, "down_proj")]
    torch.testing.assert_close(s.grad_w, grads.mean(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(s.fisher_w, grads.pow(2).mean(0), rtol=1e-4, atol=1e-10)
    # element2 with aggregation "last" is the down_proj column sum of |g·w - ½·F·w²|.
    geom = model_geometry(tiny_llama)[1]
    per_layer = {
        name: stats[(1, name)] for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }
    scores = layer_scores(decoder_layers(tiny_llama)[1], geom, per_layer, "element2", "last", True, torch.Generator())
    w = down.weight.detach()
    expected = (w * s.grad_w - 0.5 * s.fisher_w * w.pow(2)).abs().sum(0)
    torch.testing.assert_close(scores.mlp.float(), expected, rtol=1e-5, atol=1e-9)
    first = layer_scores(decoder_layers(tiny_llama)[1], geom, per_layer, "element1", "last", True, torch.Generator())
    assert not torch.equal(first.mlp, scores.mlp)


def test_artifact_writer_ships_loader_and_card(tiny_llama, tmp_path):
    from workers.engine.artifact import verify_checksums, write_artifact

    outcome = run(tiny_llama, 0.15, layer_start=1, layer_end=3)
    files = {f["path"] for f in write_artifact(outcome, None, tmp_path, model_id="tiny")}
    assert {"config.json", "model.safetensors", "modeling_slimforge_width.py", "SHA256SUMS"} <= files
    assert "trust_remote_code=True" in (tmp_path / "README.md").read_text()
    assert verify_checksums(tmp_path) == []
