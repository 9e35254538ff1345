"""LLM-Pruner's own `recovery` option: next-token LoRA on the recovery data, via the recovery engine.

Kept as the method option it always was; the training itself is `workers.engine.recovery`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.engine.recovery import RecoveryConfig, recover


@dataclass
class RecoveryResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def windows(data: torch.Tensor, seq_len: int | None) -> torch.Tensor:
    """Re-cut token rows into windows of `seq_len` (rows shorter than that are kept whole)."""
    if seq_len is None or seq_len >= data.shape[1]:
        return data
    usable = data.shape[1] // seq_len * seq_len
    return data[:, :usable].reshape(-1, seq_len)


def lora_recover(
    model: nn.Module,
    data: torch.Tensor,
    *,
    steps: int,
    lr: float,
    r: int,
    alpha: int,
    dropout: float,
    batch_size: int,
    seq_len: int | None,
    seed: int,
    on_step: Callable[[int, int, float], None],
) -> tuple[nn.Module, RecoveryResult]:
    """Train LoRA adapters for `steps` optimiser steps at a constant rate and merge them."""
    batches = windows(data, seq_len)
    config = RecoveryConfig(
        method="next_token",
        train="lora",
        n_samples=batches.shape[0],
        seq_len=batches.shape[1],
        steps=steps,
        lr=lr,
        schedule="constant",
        warmup_steps=0,
        batch_size=batch_size,
        micro_batch_size=batch_size,
        lora_r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
    )
    merged, report = recover(model, None, batches, config, seed=seed, on_step=on_step)
    return merged, RecoveryResult(steps=steps, losses=report["loss_curve"], seconds=report["seconds"])
