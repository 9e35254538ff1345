"""The `recovery` option of a job: what heals the pruned model, on which data, with which budget."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RecoveryConfig(BaseModel):
    """Recovery after pruning and compensation (validated by the API like method options)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["distill", "next_token"] = Field(
        "distill",
        description="distill: KL divergence to the dense model's next-token distribution; next_token: plain "
        "language-model loss on the data (cheaper: no teacher forward).",
    )
    train: Literal["lora", "blocks"] = Field(
        "lora", description="lora: peft adapters on every projection, merged back; blocks: full training of blocks."
    )
    blocks: Literal["around_cuts", "all"] | list[int] = Field(
        "around_cuts",
        description="With train=blocks: the kept blocks next to each cut (layer methods; every block for width "
        "methods), all blocks, or explicit indices of the pruned model.",
    )
    data: Literal["self_generated", "dataset", "mix"] = Field(
        "self_generated",
        description="self_generated: text the dense model samples itself (no corpus needed); dataset: an uploaded "
        "dataset; mix: both, mix_fraction of it self-generated.",
    )
    dataset_id: str | None = Field(None, min_length=1, max_length=64, description="Dataset for data=dataset/mix.")
    mix_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share of self-generated sequences with data=mix.")
    n_samples: int = Field(64, ge=1, le=100_000, description="Training sequences (the data is cycled over).")
    # Sampling defaults measured on a no-corpus SmolLM2 job (docs/benchmarks/recovery.md, third 7 Dec round):
    # the whole distribution at T 1.2 healed best: 1.39x / 1.40x dense perplexity, against 1.44x / 1.44x at T 1
    # and 1.52x / 1.50x at T 1.5.
    sample_top_k: int = Field(
        0, ge=0, le=1_000_000, description="Self-generated data: sample from the k likeliest tokens (0: all)."
    )
    sample_temperature: float = Field(
        1.2, gt=0.0, le=10.0, description="Self-generated data: sampling temperature (above 1: more varied text)."
    )
    seq_len: int = Field(128, ge=8, le=8192)
    # Default budget: ~10 min for SmolLM2-135M on one CPU core (docs/benchmarks/recovery.md).
    steps: int = Field(30, ge=0, le=1_000_000, description="Optimiser steps.")
    max_tokens: int | None = Field(None, ge=1, description="Stop once this many tokens were trained on.")
    lr: float | None = Field(
        None, ge=0.0, le=1.0, description="Peak learning rate (default: 5e-4 lora, 5e-5 blocks; 0 changes nothing)."
    )
    schedule: Literal["constant", "cosine", "linear"] = Field("cosine", description="Decay after the warmup.")
    warmup_steps: int = Field(3, ge=0, le=1_000_000)
    batch_size: int = Field(4, ge=1, le=4096, description="Sequences per optimiser step.")
    micro_batch_size: int | None = Field(
        None, ge=1, le=4096, description="Sequences per forward (gradient accumulation); default: min(batch, 4)."
    )
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Softening of both distributions for distill.")
    hidden_weight: float = Field(
        0.0, ge=0.0, le=1e3, description="Weight of an MSE term between hidden states at aligned layers (distill)."
    )
    ce_weight: float | None = Field(
        None,
        ge=0.0,
        le=1e3,
        description="Weight of a next-token (hard-label) term added to the distillation loss, as in classic "
        "knowledge distillation: it adapts the model to the data's own text as well as to the teacher. Default: "
        "1 with data=dataset (measured best on a corpus), 0 with self_generated (the samples' labels only repeat "
        "the teacher, and measured worse), 1 - mix_fraction with mix.",
    )
    lora_r: int = Field(8, ge=1, le=4096)
    lora_alpha: int = Field(16, ge=1, le=65536)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> RecoveryConfig:
        if self.data in ("dataset", "mix") and self.dataset_id is None:
            raise ValueError(f"data={self.data!r} needs a dataset_id")
        if self.data == "self_generated" and self.dataset_id is not None:
            raise ValueError("dataset_id is only used with data='dataset' or 'mix'")
        if self.micro_batch_size is None:
            self.micro_batch_size = min(self.batch_size, 4)
        if self.micro_batch_size > self.batch_size:
            raise ValueError("micro_batch_size must not exceed batch_size")
        if self.train == "lora" and self.blocks != "around_cuts":
            raise ValueError("blocks applies only to train='blocks'")
        return self

    @property
    def effective_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-4 if self.train == "lora" else 5e-5

    @property
    def effective_ce_weight(self) -> float:
        """The next-token term's weight: as set, or by data source (docs/benchmarks/recovery.md)."""
        if self.ce_weight is not None:
            return self.ce_weight
        return {"dataset": 1.0, "self_generated": 0.0}.get(self.data, 1.0 - self.mix_fraction)

    @property
    def ce_weight_in_use(self) -> float | None:
        """What reports show: the next-token term's weight, None where the method has no such term."""
        return self.effective_ce_weight if self.method == "distill" else None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def planned_steps(self) -> int:
        """Steps actually run: `steps`, or fewer when `max_tokens` stops it first."""
        if self.max_tokens is None:
            return self.steps
        return min(self.steps, -(-self.max_tokens // self.tokens_per_step))


def parse_recovery(raw: dict | RecoveryConfig | str | None) -> RecoveryConfig | None:
    """None, a method name ("distill"), a dict or a config -> a config (or None)."""
    if raw is None or isinstance(raw, RecoveryConfig):
        return raw
    if isinstance(raw, str):
        return RecoveryConfig(method=raw)  # type: ignore[arg-type]
    return RecoveryConfig.model_validate(raw)
