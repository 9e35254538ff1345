"""Layer scores that anticipate projection compensation (GradMAP's `kl_fisher_comp`).

`kl_fisher` estimates the KL divergence of removing a block from the whole of its residual
contribution delta. But compensation then merges a projection into the previous kept block's
residual writer, which absorbs the part of delta that is a linear function of that writer's
output; only the rest, R, is lost. This score is `kl_fisher` applied to R instead of delta:
  score(block p) = 1/2 sum_t (N g_t . R_t)^2,  R = delta_p - (what the best projection at p-1 adds),
with g the gradient of the loss against labels sampled from the model itself.

The projection of each block is the one compensation would fit (same design rows, same ridge),
solved from normal equations streamed over `fit_ids` (the job's compensation windows when it has
them): fitting on the scoring batch itself would overstate what compensation can absorb.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from workers.engine.compensation.solve import NormalEquations, apply_writer, design_rows, norm_gain
from workers.engine.compensation.writers import find_writer
from workers.engine.hidden import BlockIO, capture_forward, micro_batches
from workers.engine.layers import find_layers, model_device
from workers.engine.methods.gradient_scores import (
    embeddings_require_grad,
    gradients_only_on,
    sampled_label_loss,
    weighted_micro_batches,
)


@contextmanager
def writer_outputs(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Per block position: the detached fp32 output of its residual writer during a forward."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for position, block in enumerate(find_layers(model).layers):
        found = find_writer(block)
        if found is None:
            continue

        def hook(module: nn.Module, args: tuple, out: torch.Tensor, position: int = position) -> None:
            captured[position] = out.detach().float().reshape(-1, out.shape[-1])

        handles.append(found[0].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().reshape(-1, tensor.shape[-1])


def _design(
    model: nn.Module, position: int, z: dict[int, torch.Tensor], outputs: dict[int, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(X, Y) of the projection at the block before `position` that makes it reproduce the output of
    `position` (as if `position` were removed); None when that block has no known writer."""
    before = position - 1
    found = find_writer(find_layers(model).layers[before])
    if found is None or before not in z:
        return None
    post_norm = found[1]
    z_before = z[before]
    eye = torch.eye(z_before.shape[1], device=z_before.device)
    residual = _rows(outputs[before]) - apply_writer(z_before, eye, post_norm)
    return design_rows(z_before, residual, _rows(outputs[position]), post_norm)


@torch.no_grad()
def compensation_fits(
    model: nn.Module,
    fit_ids: torch.Tensor,
    ridge: float,
    micro_batch_size: int,
    check_cancel: Callable[[], None] = lambda: None,
) -> dict[int, torch.Tensor]:
    """Per block position p >= 1: the projection P (ridge, like compensation) at block p-1 that best
    replaces block p, from one forward of `fit_ids` through the current model."""
    n_layers = len(find_layers(model).layers)
    equations: dict[int, NormalEquations] = {}
    for batch in micro_batches(fit_ids, micro_batch_size):
        check_cancel()
        with writer_outputs(model) as z, BlockIO(model, inputs=False) as io:
            capture_forward(model, batch.to(model_device(model)))
        for position in range(1, n_layers):
            design = _design(model, position, z, io.outputs)
            if design is None:
                continue
            x, y = design
            equations.setdefault(position, NormalEquations(x.shape[1], x.device)).add(x, y)
    return {position: eq.solve(ridge) for position, eq in equations.items()}


def compensable_kl_scores(
    model: nn.Module,
    ids: torch.Tensor,
    fit_ids: torch.Tensor,
    ridge: float,
    micro_batch_size: int,
    check_cancel: Callable[[], None] = lambda: None,
    on_backward: Callable[[], None] = lambda: None,
) -> list[float]:
    """Per block of the current model: the Fisher estimate of the KL of removing it *after* compensation."""
    projections = compensation_fits(model, fit_ids, ridge, micro_batch_size, check_cancel)
    layers = find_layers(model).layers
    n_layers = len(layers)
    totals = [0.0] * n_layers
    n_tokens = ids.shape[0] * (ids.shape[1] - 1)
    generator = torch.Generator(device=model_device(model)).manual_seed(0)
    with gradients_only_on(model, []), embeddings_require_grad(model):
        for batch, share in weighted_micro_batches(ids, micro_batch_size, check_cancel):
            with writer_outputs(model) as z, BlockIO(model, keep_graph=True) as io:
                loss = sampled_label_loss(model, batch, generator)
                (loss.float() * share).backward()
                on_backward()
            outputs = {p: t.detach() for p, t in io.outputs.items()}
            for position in range(n_layers):
                g = io.outputs[position].grad.float().reshape(-1, outputs[position].shape[-1])
                lost = _rows(outputs[position]) - _rows(io.inputs[position])  # the whole delta
                design = _design(model, position, z, outputs) if position in projections else None
                if design is not None:
                    x, y = design
                    miss = y - x @ projections[position].to(x)
                    post_norm = find_writer(layers[position - 1])[1]
                    if post_norm is not None:  # back from the norm's linearised space to the stream
                        miss = miss * norm_gain(post_norm, miss.shape[1], miss.device)
                    lost = miss
                dot = (g * lost).sum(dim=-1)
                totals[position] += float(0.5 * (dot * n_tokens).pow(2).sum())
            del io, loss
    return [t / ids.numel() for t in totals]
