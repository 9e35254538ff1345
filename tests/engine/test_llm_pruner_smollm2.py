"""LLM-Pruner on the real SmolLM2-135M: 20 % of parameters, Taylor beats random, artifact reloads."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.engine.calibration import token_batches
from workers.engine.pipeline import prune


def held_out_ppl(model, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(float(model(input_ids=batch, labels=batch).loss))


@pytest.mark.slow
def test_smollm2_width_pruning_end_to_end(smollm2, wikitext_text, tmp_path):
    model, tokenizer = smollm2
    half = len(wikitext_text) // 2
    calibration = token_batches(tokenizer, [wikitext_text[:half]], n_samples=4, seq_len=64, seed=0)
    held_out = token_batches(tokenizer, [wikitext_text[half:]], n_samples=4, seq_len=128, seed=1)
    dense = held_out_ppl(model, held_out)
    random_model = copy.deepcopy(model)

    # The paper's protocol (first 4 / last 2 blocks whole), an explicit option since widths default to uniform.
    outcome = prune(
        model,
        calibration,
        method="llm_pruner",
        target_sparsity=0.2,
        sparsity_basis="parameters",
        options={"widths": "per_layer"},
    )
    report = outcome.report
    assert abs(report["achieved_parameter_sparsity"] - 0.2) <= 0.01
    widths = report["layer_widths"]
    assert [w["pruned"] for w in widths] == [False] * 4 + [True] * 24 + [False] * 2
    assert all((w["num_attention_heads"], w["num_key_value_heads"]) == (6, 2) for w in widths[4:28])
    assert (widths[0]["num_attention_heads"], widths[0]["intermediate_size"]) == (9, 1536)
    assert report["artifact_format"] == "per_layer"

    taylor = held_out_ppl(model, held_out)
    prune(
        random_model,
        calibration,
        method="llm_pruner",
        target_sparsity=0.2,
        sparsity_basis="parameters",
        options={"importance": "random", "widths": "per_layer"},
    )
    random = held_out_ppl(random_model, held_out)
    assert dense < taylor < random, (dense, taylor, random)

    outcome.save_model(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    probe = held_out[:1, :32]
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, model(probe).logits)
