"""Shared types of the pruning engine.

The engine knows nothing about HTTP, SQL or Celery: callers hand it a model, calibration token
batches, a method name with options, a progress callback and a cancel check, and get back the
pruned model plus a JSON-serialisable report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

SparsityBasis = Literal["layers", "parameters"]

# Stages a job moves through, in order; progress callbacks name one of them.
STAGES = (
    "loading_model",
    "calibrating",
    "scoring",
    "pruning",
    "compensating",
    "recovering",
    "evaluating",
    "saving",
)

# progress(stage, fraction_within_stage in [0, 1], message or None)
ProgressFn = Callable[[str, float, str | None], None]
CancelCheck = Callable[[], bool]


def no_progress(stage: str, fraction: float, message: str | None = None) -> None:
    """Default progress callback: ignore."""


def never_cancel() -> bool:
    return False


class EngineError(Exception):
    """A failure the caller can report to a user: has a stable code and a readable message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JobCancelled(Exception):
    """Raised inside the engine when the cancel check returns True."""


class SelectionStopped(Exception):
    """Raised by a `PruneContext.after_decision` hook to end an iterative selection early: a quality
    search has seen as much of the removal order as it needs."""


class MethodOptions(BaseModel):
    """Base class of every method's options; unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PruneContext:
    """Everything a pruning method needs for one run."""

    model: torch.nn.Module
    calibration: torch.Tensor  # LongTensor [n_samples, seq_len] of token ids
    target_sparsity: float
    sparsity_basis: SparsityBasis
    options: MethodOptions
    progress: ProgressFn = no_progress
    should_cancel: CancelCheck = never_cancel
    seed: int = 0
    tokenizer: Any = None  # some methods (LoRA recovery on text) need it
    # Token batches for an optional recovery step (LoRA); methods fall back to `calibration`.
    recovery_data: torch.Tensor | None = None
    # Token windows for projection compensation (its own, larger budget from the calibration's
    # source); layer methods fall back to `calibration`.
    compensation_data: torch.Tensor | None = None
    # Layers an earlier run of the same iterative selector already removed, in its order: the
    # selector continues from them (a quality search grows its removal order only as far as needed).
    resume_from: list[int] | None = None
    # Called after every decision of a selector that supports it (GradMAP), with the removal order so
    # far and the model as the selection sees it (removed layers skipped, in-loop projections merged).
    # A quality search predicts each size's quality from it; raising SelectionStopped ends the run.
    after_decision: Callable[[list[int], torch.nn.Module], None] | None = None

    def check_cancel(self) -> None:
        if self.should_cancel():
            raise JobCancelled()


@dataclass
class PruneOutcome:
    """A pruned model and its report.

    `save_model`, when set, writes the model weights + config into a directory instead of the
    default `model.save_pretrained` (width-pruned models with per-layer sizes need their own
    format and loader).
    """

    model: torch.nn.Module
    report: dict[str, Any] = field(default_factory=dict)
    save_model: Callable[[Path], None] | None = None
