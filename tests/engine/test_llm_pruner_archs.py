"""LLM-Pruner on the other supported block types: Gemma-3 (q/k norms), Qwen2 (q/k/v biases), Qwen3, Mistral."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.engine.pipeline import prune
from workers.engine.types import EngineError
from workers.engine.width.groups import decoder_layers, head_rows


def tiny(kind: str):
    from transformers import (
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common)).eval()
    return MistralForCausalLM(MistralConfig(**common)).eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _model(kind, tiny_gemma3):
    return tiny_gemma3 if kind == "gemma3" else tiny(kind)


@pytest.mark.parametrize("kind", ["gemma3", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("layers", [(0, 4), (1, 3)])
def test_prune_and_reload_identically(kind, layers, tiny_gemma3, tmp_path):
    model = _model(kind, tiny_gemma3)
    outcome = prune(
        model,
        torch.randint(0, 128, (3, 16)),
        method="llm_pruner",
        target_sparsity=0.15,
        sparsity_basis="parameters",
        options={"layer_start": layers[0], "layer_end": layers[1]},
    )
    assert abs(outcome.report["achieved_parameter_sparsity"] - 0.15) <= 0.01
    expected = logits(outcome.model, ids(1))
    outcome.save_model(tmp_path)
    remote = outcome.report["artifact_format"] == "per_layer"
    assert remote == (layers != (0, 4))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=remote).eval()
    torch.testing.assert_close(logits(reloaded, ids(1)), expected, rtol=0, atol=0)


def test_qwen2_biases_follow_their_heads():
    """Zeroing a KV group's weights *and* biases makes it useless; it must be the group removed."""
    model = tiny("qwen2")
    with torch.no_grad():
        for layer in decoder_layers(model):
            attn = layer.self_attn
            q_rows, kv_rows = head_rows([2, 3], 16), head_rows([1], 16)  # KV head 1 serves query heads 2, 3
            for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
                proj.weight[rows] = 0
                proj.bias[rows] = 0
            attn.o_proj.weight[:, q_rows] = 0
    before = logits(model, ids(2))
    geom_params = 2 * 16 * (64 + 1) * 2 + 16 * (2 * 64 + 2)  # q rows+bias, o cols, k/v rows+bias
    total = sum(p.numel() for p in model.parameters())
    outcome = prune(
        model,
        torch.randint(0, 128, (3, 16)),
        method="llm_pruner",
        target_sparsity=4 * geom_params / total,
        sparsity_basis="parameters",
        options={"layer_start": 0, "layer_end": 4, "prune_mlp": False},
    )
    assert all(r["kv_heads"] == [1] for r in outcome.report["removed_groups"].values())
    assert decoder_layers(outcome.model)[0].self_attn.q_proj.bias.shape == (32,)
    torch.testing.assert_close(logits(outcome.model, ids(2)), before, rtol=1e-5, atol=1e-5)


def test_gemma3_query_heads_with_single_kv_head():
    """Gemma-3-270M has one KV head: keep it and prune query heads; q_norm/k_norm stay per head_dim."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=128,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        )
    ).eval()
    calibration = torch.randint(0, 128, (3, 16))
    with pytest.raises(EngineError) as err:  # whole KV groups: the only group must stay, MLP alone is short
        prune(model, calibration, method="llm_pruner", target_sparsity=0.7, sparsity_basis="parameters")
    assert err.value.code == "target_unreachable" and "prune_kv_heads=false" in err.value.message
    outcome = prune(
        model,
        calibration,
        method="llm_pruner",
        target_sparsity=0.2,
        sparsity_basis="parameters",
        options={"prune_kv_heads": False},
    )
    cfg = outcome.model.config
    assert cfg.num_key_value_heads == 1 and cfg.num_attention_heads < 4 and cfg.head_dim == 16
    assert decoder_layers(outcome.model)[0].self_attn.q_norm.weight.shape == (16,)
    assert torch.isfinite(logits(outcome.model, ids(3))).all()
