"""Optional LoRA recovery after pruning (LLM-Pruner §3.3), merged back into the weights.

Adapters go on every attention and MLP projection; only they train, on next-token loss over
token windows of the recovery data. The merged model has exactly the pruned shapes again, so the
artifact needs no peft at load time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    """Train LoRA adapters for `steps` optimiser steps and merge them; returns the merged model."""
    import time

    from peft import LoraConfig, get_peft_model

    started = time.perf_counter()
    device = next(model.parameters()).device
    batches = windows(data, seq_len)
    generator = torch.Generator().manual_seed(seed)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    # Adapters train in fp32 even when the base model is half precision.
    for p in trainable:
        p.data = p.data.float()
    optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    peft_model.train()
    result = RecoveryResult(steps=steps)
    order = torch.randperm(batches.shape[0], generator=generator)
    cursor = 0
    for step in range(steps):
        if cursor + batch_size > order.numel():
            order, cursor = torch.randperm(batches.shape[0], generator=generator), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        batch = batches[idx].to(device)
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        result.losses.append(round(float(loss.detach()), 5))
        on_step(step + 1, steps, result.losses[-1])
    peft_model.eval()
    merged = peft_model.merge_and_unload()
    for name, p in merged.named_parameters():
        p.requires_grad_(flags.get(name, False))
    result.seconds = round(time.perf_counter() - started, 3)
    return merged, result
