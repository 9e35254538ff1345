"""Engine side of the first job: self-generated tokens (cache, cancel), loadable width artifacts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.tiny_models import make_tokenizer
from workers.engine.artifact import write_artifact
from workers.engine.calibration import self_generated_batches
from workers.engine.pipeline import plan, prune
from workers.engine.types import JobCancelled


def tiny_with_tokenizer(num_layers: int = 4):
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def test_self_generated_tokens_are_cached_per_model_seed_count_and_length(tmp_path) -> None:
    model, tokenizer = tiny_with_tokenizer()
    events = []
    kwargs = dict(cache_dir=tmp_path, model_key="tiny", chunk_size=3)
    first = self_generated_batches(model, tokenizer, 5, 12, seed=3, progress=lambda *a: events.append(a), **kwargs)
    assert first.shape == (5, 12) and events[-1][1] == 1.0

    def no_generate(*args, **kw):
        raise AssertionError("cached tokens must not be sampled again")

    model.generate = no_generate
    assert torch.equal(self_generated_batches(model, tokenizer, 5, 12, seed=3, **kwargs), first)
    with pytest.raises(AssertionError, match="sampled again"):  # another seed is another entry
        self_generated_batches(model, tokenizer, 5, 12, seed=4, **kwargs)
    with pytest.raises(AssertionError, match="sampled again"):  # so is another sampling recipe
        self_generated_batches(model, tokenizer, 5, 12, seed=3, top_k=0, temperature=1.5, **kwargs)


def test_sampling_recipe_changes_the_samples() -> None:
    """Full-distribution sampling at a higher temperature draws other text than the top-k default."""
    model, tokenizer = tiny_with_tokenizer()
    default = self_generated_batches(model, tokenizer, 4, 16, seed=0)
    varied = self_generated_batches(model, tokenizer, 4, 16, seed=0, top_k=0, temperature=1.5)
    assert varied.shape == default.shape and not torch.equal(varied, default)
    assert torch.equal(self_generated_batches(model, tokenizer, 4, 16, seed=0, top_k=0, temperature=1.5), varied)


def test_a_cancel_stops_sampling_at_the_next_token() -> None:
    model, tokenizer = tiny_with_tokenizer()
    calls = []

    def cancel_after_ten() -> bool:
        calls.append(1)
        return len(calls) > 10

    with pytest.raises(JobCancelled):
        self_generated_batches(model, tokenizer, 4, 400, should_cancel=cancel_after_ten)
    assert len(calls) == 11  # one check before sampling, then one per decoded token until the cancel


def test_default_llm_pruner_artifact_loads_with_stock_transformers(tmp_path) -> None:
    model, tokenizer = tiny_with_tokenizer()
    ids = torch.randint(3, len(tokenizer), (4, 24), generator=torch.Generator().manual_seed(0))
    outcome = prune(model, ids, method="llm_pruner", target_sparsity=0.2, sparsity_basis="parameters")
    report = outcome.report
    assert report["artifact_format"] == "uniform" and report["pruned_layers"] == [0, 1, 2, 3]
    assert "warnings" not in report
    write_artifact(outcome, tokenizer, tmp_path, model_id="tiny", dtype=torch.float32)
    assert not list(tmp_path.glob("modeling_*.py"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no trust_remote_code
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, outcome.model(ids).logits, atol=1e-5)


def test_per_layer_protocol_carries_a_loading_warning() -> None:
    model, _ = tiny_with_tokenizer(num_layers=12)
    options = {"widths": "per_layer"}
    dry = plan(model.config, method="llm_pruner", target_sparsity=0.1, sparsity_basis="parameters", options=options)
    assert dry["artifact_format"] == "per_layer" and "trust_remote_code=True" in dry["warnings"]["loading"]
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    outcome = prune(model, ids, method="llm_pruner", target_sparsity=0.1, sparsity_basis="parameters", options=options)
    assert outcome.report["pruned_layers"] == list(range(4, 10))
    assert "trust_remote_code=True" in outcome.report["warnings"]["loading"]


def test_dataset_holdout_shares_no_token_window_with_calibration() -> None:
    from workers.engine.calibration import token_batches, token_batches_with_holdout

    tokenizer = make_tokenizer()
    text = " ".join(f"word{i}" for i in range(3000))
    calibration, heldout, disjoint = token_batches_with_holdout(tokenizer, [text], 4, 2, 32, seed=5)
    assert disjoint and torch.equal(calibration, token_batches(tokenizer, [text], 4, 32, seed=5))
    # Too few aligned windows for 6 rows (100..180 tokens): the held-out rows come from the tail.
    short = next(text[:n] for n in range(100, 3000, 20) if len(tokenizer(text[:n])["input_ids"]) >= 100)
    n_tokens = len(tokenizer(short, add_special_tokens=False)["input_ids"])
    calibration, heldout, disjoint = token_batches_with_holdout(tokenizer, [short], 4, 2, 32, seed=5)
    assert disjoint and n_tokens // 32 < 6 and heldout.shape == (2, 32)
    rows = {tuple(r) for r in calibration.tolist()}
    assert not rows & {tuple(r) for r in heldout.tolist()}


def test_compensation_windows_add_to_calibration_without_touching_the_holdout() -> None:
    from workers.engine.calibration import compensation_batch, job_windows, token_batches_with_holdout

    tokenizer = make_tokenizer()
    text = " ".join(f"word{i}" for i in range(3000))
    calibration, heldout, disjoint = token_batches_with_holdout(tokenizer, [text], 4, 2, 32, seed=5)
    same_calibration, same_heldout, extra, still_disjoint = job_windows(tokenizer, [text], 4, 2, 12, 32, seed=5)
    # Asking for compensation windows changes neither the calibration nor the held-out rows.
    assert torch.equal(calibration, same_calibration) and torch.equal(heldout, same_heldout)
    assert extra.shape == (12, 32) and disjoint and still_disjoint
    held = {tuple(r) for r in heldout.tolist()}
    assert not held & {tuple(r) for r in extra.tolist()}
    windows = compensation_batch(calibration, extra, 16)
    assert windows.shape == (16, 32) and torch.equal(windows[:4], calibration)
    assert torch.equal(compensation_batch(calibration, extra, 3), calibration[:3])
    # Short text: the held-out rows keep the tail, and compensation windows never come from it.
    short = next(text[:n] for n in range(100, 3000, 20) if len(tokenizer(text[:n])["input_ids"]) >= 100)
    calibration, heldout, extra, disjoint = job_windows(tokenizer, [short], 4, 2, 6, 32, seed=5)
    assert disjoint and extra.shape == (6, 32)
    assert not {tuple(r) for r in heldout.tolist()} & {tuple(r) for r in extra.tolist()}
