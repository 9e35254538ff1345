"""Measure held-out loss/perplexity, and the pruned model as it was before compensation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from workers.engine.compensation import find_writer
from workers.engine.hidden import lm_loss, micro_batches
from workers.engine.layers import find_layers
from workers.engine.types import CancelCheck, JobCancelled, never_cancel


@torch.no_grad()
def heldout_quality(
    model: nn.Module, ids: torch.Tensor, should_cancel: CancelCheck = never_cancel, micro_batch_size: int = 4
) -> dict[str, Any]:
    """Mean next-token loss over every predicted token of `ids`, and its perplexity."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        # Rows all have one length, so per-micro-batch means weight by rows; cancel checked between.
        for batch in micro_batches(ids, micro_batch_size):
            if should_cancel():
                raise JobCancelled()
            total += lm_loss(model, batch, micro_batch_size) * batch.shape[0]
    finally:
        model.train(was_training)
    loss = total / max(ids.shape[0], 1)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    return {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50.0)), 4), "tokens": tokens}


class WriterSnapshot:
    """The original weights of every block's residual writer (the weights compensation changes).

    Taken before pruning; `original()` swaps them back into whichever blocks survived, so the pruned
    model can be measured as it was before its projections were merged. Kept on the CPU.
    """

    def __init__(self, model: nn.Module) -> None:
        self._saved: list[tuple[nn.Linear, torch.Tensor, torch.Tensor | None]] = []
        for block in find_layers(model).layers:
            found = find_writer(block)
            if found is not None:
                linear = found[0]
                bias = None if linear.bias is None else linear.bias.detach().to("cpu", copy=True)
                self._saved.append((linear, linear.weight.detach().to("cpu", copy=True), bias))

    @contextmanager
    @torch.no_grad()
    def original(self, model: nn.Module) -> Iterator[nn.Module]:
        alive = {id(m) for m in model.modules()}
        swapped = []
        try:
            for linear, weight, bias in self._saved:
                if id(linear) not in alive:
                    continue  # its block was removed
                swapped.append((linear, linear.weight.detach().clone(), None if bias is None else linear.bias.clone()))
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            yield model
        finally:
            for linear, weight, bias in swapped:
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
