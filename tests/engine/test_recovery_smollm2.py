"""Recovery on the real SmolLM2-135M with a short budget: distillation heals toward the dense model."""

from __future__ import annotations

import pytest
import torch

from workers.engine.calibration import token_batches
from workers.engine.pipeline import prune
from workers.engine.recovery.losses import distill_kl


@pytest.mark.slow
def test_distillation_on_smollm2_lowers_kl_to_dense(smollm2, wikitext_text):
    model, tokenizer = smollm2
    first_half = wikitext_text[: len(wikitext_text) // 2]
    calibration = token_batches(tokenizer, [first_half], 2, 64, seed=0)
    recovery = {
        "method": "distill",
        "data": "dataset",
        "dataset_id": "wiki-first-half",
        "n_samples": 4,
        "seq_len": 64,
        "steps": 4,
        "batch_size": 2,
        "micro_batch_size": 2,
        "lr": 1e-3,
        "warmup_steps": 0,
    }
    kept: dict[str, torch.Tensor] = {"dense": _logits(model, calibration)}
    outcome = prune(
        model,
        calibration,
        method="last_k",
        target_sparsity=0.1,
        tokenizer=tokenizer,
        recovery=recovery,
        recovery_texts=[first_half],
        after_pruning=lambda pruned: kept.update(logits=_logits(pruned.model, calibration)),
    )
    reference = kept["dense"]
    before = float(distill_kl(kept["logits"], reference, 1.0))
    after = float(distill_kl(_logits(outcome.model, calibration), reference, 1.0))
    report = outcome.report["recovery"]
    assert report["steps_run"] == 4 and report["tokens_trained"] == 4 * 2 * 64
    assert after < before  # healed toward the dense model (on text of the recovery domain)


@torch.no_grad()
def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model.eval()(tokens).logits
