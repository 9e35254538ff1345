"""How far the pruned model drifts from the original per kept layer, and where to correct it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from workers.engine.compensation.config import Placement
from workers.engine.hidden import BlockIO, capture_forward, forward_ids, micro_batches
from workers.engine.layers import layer_subset


def token_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1]).float()


@torch.no_grad()
def original_outputs(model: nn.Module, batch: torch.Tensor, last: int | None = None) -> dict[int, torch.Tensor]:
    """Outputs of the blocks 0..last (default: all) of the unpruned model for one micro-batch, fp32 rows."""
    with BlockIO(model, None if last is None else range(last + 1), inputs=False, stop_after=last) as io:
        capture_forward(model, batch)
    return {i: token_rows(h) for i, h in io.outputs.items()}


@torch.no_grad()
def measure_shift(
    model: nn.Module,
    keep: Sequence[int],
    ids: torch.Tensor,
    micro_batch_size: int = 4,
    check_cancel: Callable[[], None] = lambda: None,
) -> list[dict[str, Any]]:
    """Per kept layer: how far the pruned model's output is from the original's at that layer.

    `shift` is the mean per-token distance relative to the mean original norm, `mean_shift` the norm
    of the mean difference vector (the shift of the distribution's mean) relative to the same norm,
    `abs_shift` the mean per-token distance itself.
    """
    keep = sorted(keep)
    n_keep = len(keep)
    dist = torch.zeros(n_keep, dtype=torch.float64)
    norm = torch.zeros(n_keep, dtype=torch.float64)
    diff_sum: list[torch.Tensor | None] = [None] * n_keep
    tokens = 0
    for batch in micro_batches(ids, micro_batch_size):
        check_cancel()
        reference = original_outputs(model, batch, last=keep[-1])
        with layer_subset(model, keep), BlockIO(model, inputs=False) as io:
            forward_ids(model, batch)
        for position, original_index in enumerate(keep):
            pruned = token_rows(io.outputs[position])
            target = reference[original_index]
            delta = pruned - target
            dist[position] += delta.norm(dim=-1).double().sum().cpu()
            norm[position] += target.norm(dim=-1).double().sum().cpu()
            summed = delta.double().sum(dim=0).cpu()
            diff_sum[position] = summed if diff_sum[position] is None else diff_sum[position] + summed
        tokens += batch.numel()
    rows = []
    for position, original_index in enumerate(keep):
        mean_norm = float(norm[position] / tokens)
        mean_dist = float(dist[position] / tokens)
        mean_vec = float(diff_sum[position].norm() / tokens) if diff_sum[position] is not None else 0.0
        rows.append(
            {
                "layer": original_index,
                "position": position,
                "shift": mean_dist / mean_norm if mean_norm else 0.0,
                "mean_shift": mean_vec / mean_norm if mean_norm else 0.0,
                "abs_shift": mean_dist,
                "hidden_norm": mean_norm,
            }
        )
    return rows


Shifts = list[dict[str, Any]] | Callable[[], list[dict[str, Any]]]


def choose_placements(
    keep: Sequence[int], n_layers: int, shifts: Shifts, placement: Placement, max_projections: int
) -> list[int]:
    """Kept-layer positions (in the pruned numbering) that receive a projection, in forward order.

    `shifts` may be a function: the drift is then measured only when the placement needs it (the
    max_* placements, or more removed blocks than `max_projections`), which in-loop compensation
    relies on to stay cheap.
    """
    keep = sorted(keep)
    removed = sorted(set(range(n_layers)) - set(keep))
    if not removed:
        return []
    if callable(shifts):
        measure = shifts
        cache: list[list[dict[str, Any]]] = []

        def get_shifts() -> list[dict[str, Any]]:
            if not cache:
                cache.append(measure())
            return cache[0]
    else:

        def get_shifts(known: list[dict[str, Any]] = shifts) -> list[dict[str, Any]]:
            return known

    if placement in ("max_relative_shift", "max_shift"):
        key = "shift" if placement == "max_relative_shift" else "abs_shift"
        # Only layers at or after the first cut can have drifted.
        candidates = [row for row in get_shifts() if row["layer"] > removed[0]]
        ranked = sorted(candidates, key=lambda row: -row[key])[:max_projections]
        return sorted(row["position"] for row in ranked)
    # Removed blocks = maximal runs of consecutive removed indices.
    blocks: list[list[int]] = []
    for index in removed:
        if blocks and index == blocks[-1][-1] + 1:
            blocks[-1].append(index)
        else:
            blocks.append([index])
    positions: list[int] = []
    for block in blocks:
        after = [p for p, i in enumerate(keep) if i > block[-1]]
        before = [p for p, i in enumerate(keep) if i < block[0]]
        if placement == "after_cut":
            chosen = [after[0]] if after else before[-1:]
        elif placement == "before_cut":  # the layer right before the block absorbs it
            chosen = before[-1:] if before else after[:1]
        else:  # around_cut: try both sides; the held-out check keeps whichever helps
            chosen = before[-1:] + after[:1]
        positions.extend(p for p in chosen if p not in positions)
    if len(positions) > max_projections:
        # Keep the cuts that introduce the largest relative shift.
        measured = get_shifts()
        by_shift = sorted(positions, key=lambda p: -measured[p]["shift"])[:max_projections]
        positions = sorted(by_shift)
    return sorted(positions)


def target_index(keep: Sequence[int], position: int, n_layers: int) -> int:
    """Original layer whose output the pruned model should reproduce after kept position `position`.

    That is the original stream just before the next kept layer: the placement absorbs every
    removed layer between it and the next kept one.
    """
    keep = sorted(keep)
    return keep[position + 1] - 1 if position + 1 < len(keep) else n_layers - 1
