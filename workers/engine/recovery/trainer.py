"""The recovery loop: train LoRA adapters or chosen blocks of the pruned model, step by step.

The teacher (the dense model) is run on each micro-batch as it comes ("streamed"): its logits
never outlive the micro-batch, so memory stays at one micro-batch of logits however long the run.
On GPU the forward passes run under bf16 autocast while trained weights stay fp32 (master weights).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers.engine.layers import find_layers
from workers.engine.recovery.config import RecoveryConfig
from workers.engine.recovery.lora import attach_lora, merge_lora
from workers.engine.recovery.losses import distill_kl, hidden_mse, next_token
from workers.engine.resources import PeakMemory
from workers.engine.types import CancelCheck, EngineError, JobCancelled, ProgressFn, never_cancel, no_progress

STAGE = "recovering"


@dataclass
class Alignment:
    """Which original (dense) block each block of the pruned model continues; None = same index."""

    kept_layers: list[int] | None = None
    removed_layers: list[int] | None = None

    def teacher_layer(self, student_layer: int) -> int:
        return self.kept_layers[student_layer] if self.kept_layers is not None else student_layer


def blocks_to_train(config: RecoveryConfig, n_blocks: int, alignment: Alignment) -> list[int]:
    """Indices (in the pruned model) of the blocks that train fully with train=blocks."""
    if isinstance(config.blocks, list):
        bad = [b for b in config.blocks if not 0 <= b < n_blocks]
        if bad:
            raise EngineError("invalid_recovery", f"blocks {bad} do not exist; the pruned model has {n_blocks}.")
        return sorted(set(config.blocks))
    if config.blocks == "all" or not alignment.removed_layers or alignment.kept_layers is None:
        return list(range(n_blocks))
    removed = set(alignment.removed_layers)
    # A kept block borders a cut when its original neighbour (before or after) was removed.
    return [j for j, orig in enumerate(alignment.kept_layers) if orig - 1 in removed or orig + 1 in removed]


def lr_factor(config: RecoveryConfig, total: int):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if config.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _prepare(model: nn.Module, config: RecoveryConfig, blocks: list[int]) -> tuple[nn.Module, list[nn.Parameter]]:
    """Make only what trains require grad (in fp32); returns the model to train and those parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    if config.train == "lora":
        model = attach_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout)
        trainable = [p for p in model.parameters() if p.requires_grad]
    else:
        layers = find_layers(model).layers
        trainable = [p for j in blocks for p in layers[j].parameters()]
        for p in trainable:
            p.requires_grad_(True)
    for p in trainable:
        p.data = p.data.float()  # fp32 master weights even when the model is half precision
    return model, trainable


def _finish(model: nn.Module, config: RecoveryConfig, trainable: list[nn.Parameter], dtype: torch.dtype) -> nn.Module:
    model.eval()
    if config.train == "lora":
        model = merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def recover(
    student: nn.Module,
    teacher: nn.Module | None,
    tokens: torch.Tensor,
    config: RecoveryConfig,
    *,
    alignment: Alignment | None = None,
    progress: ProgressFn = no_progress,
    should_cancel: CancelCheck = never_cancel,
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train `student` on `tokens` ([n, seq_len]) and return the plain (merged) model and a report."""
    if config.method == "distill" and teacher is None:
        raise EngineError("invalid_recovery", "Distillation needs the dense model as teacher.")
    alignment = alignment or Alignment()
    param = next(student.parameters())
    device, dtype = param.device, param.dtype
    n_blocks = len(find_layers(student).layers)
    blocks = blocks_to_train(config, n_blocks, alignment) if config.train == "blocks" else []
    # The last entry of HF hidden_states is after the final norm: align only the blocks before it.
    hidden_layers = list(range(n_blocks - 1)) if config.method == "distill" and config.hidden_weight > 0 else []
    total = config.planned_steps
    started = time.perf_counter()
    losses: list[float] = []
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(tokens.shape[0], generator=generator), 0
    model, trainable = _prepare(student, config, blocks)
    optimiser = torch.optim.AdamW(trainable, lr=config.effective_lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor(config, total))
    if teacher is not None:
        teacher.eval()
    model.train()
    with PeakMemory() as memory:
        for step in range(total):
            if should_cancel():
                raise JobCancelled()
            step_loss = 0.0
            micro = config.micro_batch_size or config.batch_size  # set by the config's validator
            for start in range(0, config.batch_size, micro):
                size = min(micro, config.batch_size - start)
                if cursor + size > order.numel():
                    order, cursor = torch.randperm(tokens.shape[0], generator=generator), 0
                batch = tokens[order[cursor : cursor + min(size, order.numel())]].to(device)
                cursor += batch.shape[0]
                with _autocast(device, dtype):
                    loss = _loss(model, teacher, batch, config, hidden_layers, alignment)
                (loss * batch.shape[0] / config.batch_size).backward()
                step_loss += float(loss.detach()) * batch.shape[0] / config.batch_size
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            schedule.step()
            losses.append(round(step_loss, 5))
            progress(STAGE, (step + 1) / max(total, 1), f"step {step + 1}/{total} loss {step_loss:.4f}")
            if on_step is not None:
                on_step(step + 1, total, step_loss)
    model = _finish(model, config, trainable, dtype)
    seconds = time.perf_counter() - started
    report = {
        **config.model_dump(mode="json"),
        "ce_weight_used": config.ce_weight_in_use,
        "steps_run": total,
        "tokens_trained": total * config.tokens_per_step,
        "trained_blocks": blocks if config.train == "blocks" else None,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "loss_curve": losses,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(total * config.tokens_per_step / seconds, 1) if seconds > 0 else None,
        "peak_memory": memory.summary(),
    }
    return model, report


def _loss(
    model: nn.Module,
    teacher: nn.Module | None,
    batch: torch.Tensor,
    config: RecoveryConfig,
    hidden_layers: list[int],
    alignment: Alignment,
) -> torch.Tensor:
    want_hidden = bool(hidden_layers)
    out = model(input_ids=batch, use_cache=False, output_hidden_states=want_hidden)
    if config.method == "next_token":
        return next_token(out.logits, batch)
    assert teacher is not None
    with torch.no_grad():
        ref = teacher(input_ids=batch, use_cache=False, output_hidden_states=want_hidden)
    loss = distill_kl(out.logits, ref.logits, config.temperature)
    if want_hidden:
        # hidden_states[i + 1] is the output of block i.
        student_states = [out.hidden_states[j + 1] for j in hidden_layers]
        teacher_states = [ref.hidden_states[alignment.teacher_layer(j) + 1] for j in hidden_layers]
        loss = loss + config.hidden_weight * hidden_mse(student_states, teacher_states)
    if config.effective_ce_weight > 0:
        loss = loss + config.effective_ce_weight * next_token(out.logits, batch)
    return loss
