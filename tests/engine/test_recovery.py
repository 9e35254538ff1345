"""Recovery stage on tiny random models: distillation, next-token, LoRA merge, full blocks, cancel."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from workers.engine.pipeline import prune
from workers.engine.recovery import Alignment, RecoveryConfig, recover
from workers.engine.recovery.losses import distill_kl
from workers.engine.recovery.trainer import blocks_to_train
from workers.engine.types import JobCancelled


def ids(n: int = 8, seq: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits


@torch.no_grad()
def kl(student, teacher, tokens: torch.Tensor) -> float:
    return float(distill_kl(logits(student, tokens), logits(teacher, tokens), 1.0))


def pruned_pair(model):
    """(dense teacher, student with layer 1 removed, alignment)."""
    from workers.engine.layers import remove_layers

    teacher = copy.deepcopy(model).eval()
    remove_layers(model, [1])
    return teacher, model, Alignment(kept_layers=[0, 2, 3], removed_layers=[1])


def config(**changes) -> RecoveryConfig:
    base = {"n_samples": 8, "seq_len": 24, "steps": 12, "batch_size": 4, "micro_batch_size": 2, "lr": 5e-3}
    return RecoveryConfig(**{**base, **changes})


@pytest.mark.parametrize("train", ["lora", "blocks"])
def test_zero_learning_rate_leaves_logits_unchanged(tiny_llama, train):
    teacher, student, alignment = pruned_pair(tiny_llama)
    data, probe = ids(), ids(2, 16, seed=9)
    before = logits(student, probe)
    healed, report = recover(student, teacher, data, config(lr=0.0, train=train), alignment=alignment)
    assert torch.allclose(logits(healed, probe), before, atol=1e-6, rtol=0)
    assert report["steps_run"] == 12 and len(report["loss_curve"]) == 12


@pytest.mark.parametrize(("train", "hidden_weight"), [("lora", 0.0), ("blocks", 0.0), ("lora", 1.0)])
def test_distillation_lowers_kl_on_its_own_data(tiny_llama, train, hidden_weight):
    teacher, student, alignment = pruned_pair(tiny_llama)
    data = ids()
    start = kl(student, teacher, data)
    cfg = config(train=train, hidden_weight=hidden_weight, steps=25)
    healed, report = recover(student, teacher, data, cfg, alignment=alignment)
    assert kl(healed, teacher, data) < 0.7 * start
    assert report["tokens_trained"] == 25 * 4 * 24
    if train == "blocks":
        assert report["trained_blocks"] == [0, 1]  # kept layers 0 and 2 border the cut at 1


def test_ce_weight_adds_the_next_token_term_to_distillation(tiny_llama):
    from workers.engine.recovery.losses import next_token
    from workers.engine.recovery.trainer import _loss

    teacher = copy.deepcopy(tiny_llama).eval()
    batch = ids(2, 16)
    plain = _loss(tiny_llama, teacher, batch, config(), [], Alignment())
    mixed = _loss(tiny_llama, teacher, batch, config(ce_weight=0.5), [], Alignment())
    assert float(plain) == pytest.approx(0.0, abs=1e-6)  # the student is the teacher: no KL
    assert float(mixed) == pytest.approx(0.5 * float(next_token(logits(tiny_llama, batch), batch)), rel=1e-5)


def test_next_token_term_defaults_by_data_source():
    # Measured: helps on a real corpus, hurts on the teacher's own samples (docs/benchmarks/recovery.md).
    assert RecoveryConfig(data="dataset", dataset_id="d").effective_ce_weight == 1.0
    assert RecoveryConfig().effective_ce_weight == 0.0
    assert RecoveryConfig(data="mix", dataset_id="d", mix_fraction=0.25).effective_ce_weight == 0.75
    assert RecoveryConfig(data="dataset", dataset_id="d", ce_weight=0.0).effective_ce_weight == 0.0


def test_only_chosen_blocks_change(tiny_llama):
    teacher, student, alignment = pruned_pair(tiny_llama)
    frozen = copy.deepcopy(student.model.layers[2].state_dict())
    healed, _ = recover(student, teacher, ids(), config(train="blocks", blocks=[0]), alignment=alignment)
    for name, value in healed.model.layers[2].state_dict().items():
        assert torch.equal(value, frozen[name])
    assert blocks_to_train(config(train="blocks", blocks="all"), 3, alignment) == [0, 1, 2]


def test_next_token_lowers_language_model_loss(tiny_llama):
    data = ids(4, 24)
    with torch.no_grad():
        start = float(tiny_llama(data, labels=data).loss)
    healed, _ = recover(tiny_llama, None, data, config(method="next_token", steps=20))
    with torch.no_grad():
        assert float(healed(data, labels=data).loss) < start


def test_pipeline_recovery_merges_and_reloads_identically(tiny_llama, tmp_path):
    from workers.engine.artifact import write_artifact

    cal = ids(4, 24, seed=3)
    stages = []
    outcome = prune(
        tiny_llama,
        cal,
        method="gradmap",
        target_sparsity=0.25,
        options={"compensation": False},
        recovery={
            "method": "distill",
            "data": "dataset",
            "dataset_id": "d",
            "n_samples": 8,
            "seq_len": 24,
            "steps": 3,
            "batch_size": 2,
            "micro_batch_size": 1,
        },
        recovery_texts=["unused: a tokenizer-free test passes tokens"],
        tokenizer=_IdTokenizer(),
        progress=lambda stage, fraction, message=None: stages.append(stage),
    )
    recovery = outcome.report["recovery"]
    assert recovery["steps_run"] == 3 and len(recovery["data_tokens_sha256"]) == 64
    assert "recovering" in stages and stages.index("recovering") < len(stages)
    assert not any("lora" in name for name, _ in outcome.model.named_parameters())  # merged: plain model
    write_artifact(outcome, None, tmp_path, model_id="tiny")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    probe = ids(2, 16, seed=11)
    assert torch.equal(logits(reloaded, probe), logits(outcome.model, probe))


def test_cancel_during_recovery_raises(tiny_llama):
    teacher, student, alignment = pruned_pair(tiny_llama)
    calls = {"n": 0}

    def cancel_after_two_steps() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(JobCancelled):
        recover(student, teacher, ids(), config(), alignment=alignment, should_cancel=cancel_after_two_steps)


def test_invalid_configs_are_refused():
    with pytest.raises(ValidationError, match="dataset_id"):
        RecoveryConfig(data="dataset")
    with pytest.raises(ValidationError, match="micro_batch_size"):
        RecoveryConfig(batch_size=2, micro_batch_size=4)
    with pytest.raises(ValidationError):
        RecoveryConfig(method="sft")
    assert RecoveryConfig(steps=100, max_tokens=1000, batch_size=2, seq_len=100).planned_steps == 5


class _IdTokenizer:
    """Stands in for a tokenizer where the dataset text is already token ids (0..127)."""

    eos_token_id = None
    bos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 128 for c in text * 8]}


def test_width_pruned_per_layer_model_recovers_and_reloads_identically(tiny_llama, tmp_path):
    outcome = prune(
        tiny_llama,
        ids(4, 24, seed=3),
        method="llm_pruner",
        target_sparsity=0.15,
        sparsity_basis="parameters",
        options={"layer_start": 1, "layer_end": 3},
        recovery={
            "method": "distill",
            "train": "blocks",
            "data": "dataset",
            "dataset_id": "d",
            "n_samples": 4,
            "seq_len": 24,
            "steps": 3,
            "batch_size": 2,
            "micro_batch_size": 2,
            "lr": 1e-3,
        },
        recovery_texts=["tokens"],
        tokenizer=_IdTokenizer(),
    )
    assert outcome.report["artifact_format"] == "per_layer"
    assert outcome.report["recovery"]["trained_blocks"] == [0, 1, 2, 3]  # width methods: every block
    probe = ids(2, 16, seed=12)
    outcome.save_model(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert torch.equal(logits(reloaded, probe), logits(outcome.model, probe))
