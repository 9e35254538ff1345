"""One placement's fit rows, streamed micro-batch by micro-batch: original targets, pruned inputs."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.engine.compensation.config import CompensationConfig
from workers.engine.compensation.drift import token_rows
from workers.engine.compensation.replay import PrefixReplay
from workers.engine.compensation.solve import NormalEquations, apply_writer, design_rows, refine_projection
from workers.engine.compensation.writers import OriginalWeights, find_writer
from workers.engine.hidden import BlockIO, capture_forward, micro_batches
from workers.engine.layers import find_layers, layer_subset


@torch.no_grad()
def _original_rows(model: nn.Module, layer: int, batch: torch.Tensor) -> torch.Tensor:
    with BlockIO(model, [layer], inputs=False, stop_after=layer) as io:
        capture_forward(model, batch)
    return token_rows(io.outputs[layer])


def _writer_split(
    writer: nn.Linear, post_norm: nn.Module | None, run: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, residual) token rows of the block output `run()` computes: output = residual + f(z),
    z being what `writer` returned during the run."""
    captured: list[torch.Tensor] = []
    handle = writer.register_forward_hook(lambda m, a, out: captured.append(out.detach().float()))
    try:
        output = run()
    finally:
        handle.remove()
    z = token_rows(captured[-1])
    contribution = apply_writer(z, torch.eye(z.shape[1], device=z.device), post_norm)
    return z, token_rows(output) - contribution


@torch.no_grad()
def _pruned_rows(
    model: nn.Module, keep: Sequence[int], position: int, batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, residual) token rows of the pruned model at a placement, from a forward of `batch`."""
    writer, post_norm, _ = find_writer(find_layers(model).layers[keep[position]])

    def placement_output() -> torch.Tensor:
        with layer_subset(model, keep), BlockIO(model, [position], inputs=False, stop_after=position) as pruned:
            capture_forward(model, batch)
        return pruned.outputs[position]

    return _writer_split(writer, post_norm, placement_output)


@torch.no_grad()
def _replayed_rows(
    prefix: PrefixReplay, index: int, position: int, writer: nn.Linear, post_norm: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_pruned_rows` for micro-batch `index`, from the replayed state entering the placement."""
    return _writer_split(writer, post_norm, lambda: prefix.run_block(index, position))


@torch.no_grad()
def capture_pruned(
    model: nn.Module,
    keep: Sequence[int],
    position: int,
    ids: torch.Tensor,
    micro_batch_size: int,
    max_tokens: int,
    check_cancel: Callable[[], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, residual) rows of the pruned model at a placement, at most `max_tokens` of them."""
    zs, residuals = [], []
    rows = 0
    for batch in micro_batches(ids, micro_batch_size):
        if rows >= max_tokens:
            break
        check_cancel()
        z, residual = _pruned_rows(model, keep, position, batch)
        zs.append(z)
        residuals.append(residual)
        rows += z.shape[0]
    return torch.cat(zs)[:max_tokens], torch.cat(residuals)[:max_tokens]


TargetCache = list[dict[int, torch.Tensor]]  # per micro-batch: original layer -> target rows


@torch.no_grad()
def original_targets(
    model: nn.Module,
    target_layers: Collection[int],
    ids: torch.Tensor,
    originals: OriginalWeights,
    micro_batch_size: int,
    check_cancel: Callable[[], None] = lambda: None,
) -> TargetCache:
    """The original model's outputs at every target layer, one forward per micro-batch (writers unmerged).

    The same micro-batches as `stream_placement`, so its rows are the ones that pass would compute.
    """
    wanted = sorted(set(target_layers))
    cache: TargetCache = []
    for batch in micro_batches(ids, micro_batch_size):
        check_cancel()
        with originals.active(), BlockIO(model, wanted, inputs=False, stop_after=wanted[-1]) as io:
            capture_forward(model, batch)
        cache.append({layer: token_rows(io.outputs[layer]) for layer in wanted})
    return cache


def target_cache_fits(tokens: int, dim: int, n_targets: int, budget_mib: float) -> bool:
    """Whether the fp32 targets of `n_targets` layers of width `dim` for `tokens` rows fit the budget."""
    return tokens * dim * 4 * n_targets <= budget_mib * 2**20


@dataclass
class Capture:
    """One streaming pass at a placement: its normal equations and, for refinement, some rows."""

    equations: NormalEquations
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (z, residual, target)


@torch.no_grad()
def stream_placement(
    model: nn.Module,
    keep: Sequence[int],
    position: int,
    target_layer: int,
    ids: torch.Tensor,
    originals: OriginalWeights,
    micro_batch_size: int,
    keep_rows: int = 0,
    check_cancel: Callable[[], None] = lambda: None,
    targets: TargetCache | None = None,
    prefix: PrefixReplay | None = None,
) -> Capture:
    """Accumulate X^T X / X^T Y of a placement over `ids`, one micro-batch at a time.

    Per micro-batch the original model (writers unmerged) gives the target -- or `targets`, the
    same rows captured beforehand by `original_targets` -- and the pruned model (with every
    projection merged so far) gives z and the residual -- or `prefix`, the pruned model's state
    replayed from the previous placement; only `keep_rows` rows are kept.
    """
    writer, post_norm, _ = find_writer(find_layers(model).layers[keep[position]])
    if prefix is not None:
        prefix.advance(position)
    equations: NormalEquations | None = None
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    n_kept = 0
    for index, batch in enumerate(micro_batches(ids, micro_batch_size)):
        check_cancel()
        if targets is not None:
            target = targets[index][target_layer]
        else:
            with originals.active():
                target = _original_rows(model, target_layer, batch)
        if prefix is not None:
            z, residual = _replayed_rows(prefix, index, position, writer, post_norm)
        else:
            z, residual = _pruned_rows(model, keep, position, batch)
        x, y = design_rows(z, residual, target, post_norm)
        if equations is None:
            equations = NormalEquations(x.shape[1], x.device)
        equations.add(x, y)
        if n_kept < keep_rows:
            kept.append((z, residual, target))
            n_kept += z.shape[0]
    assert equations is not None, "stream_placement needs at least one sample"
    rows = None
    if kept:
        rows = tuple(torch.cat([part[i] for part in kept])[:keep_rows] for i in range(3))
    return Capture(equations, rows)  # type: ignore[arg-type]


def solve_captures(
    captures: Sequence[Capture], post_norm: nn.Module | None, config: CompensationConfig
) -> torch.Tensor:
    """Closed-form P from the summed equations, then optional Adam steps on the kept rows."""
    total = captures[0].equations
    for capture in captures[1:]:
        total = total + capture.equations
    projection = total.solve(config.ridge)
    rows = [c.rows for c in captures if c.rows is not None]
    if config.refine_steps > 0 and rows:
        z, residual, target = (torch.cat([r[i] for r in rows]) for i in range(3))
        projection = refine_projection(
            z, residual, target, post_norm, projection, config.ridge, config.refine_steps, config.refine_lr
        )
    return projection
