"""`compensate`: fit, merge and judge the projections of a pruned model, placement by placement."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers.engine.compensation.config import CompensationConfig
from workers.engine.compensation.drift import Shifts, choose_placements, measure_shift, target_index
from workers.engine.compensation.replay import PrefixReplay
from workers.engine.compensation.streaming import (
    Capture,
    TargetCache,
    original_targets,
    solve_captures,
    stream_placement,
    target_cache_fits,
)
from workers.engine.compensation.writers import OriginalWeights, find_writer, merge_projection, snapshot_linear
from workers.engine.hidden import lm_loss
from workers.engine.layers import find_layers, layer_subset


@dataclass
class SplitCache:
    """What one split's streaming passes reuse: the original targets and the replayed pruned prefix."""

    targets: TargetCache | None  # None where this split is never streamed (only judged)
    prefix: PrefixReplay


SplitTargets = tuple[TargetCache | None, TargetCache | None]  # original targets of the (fit, held-out) split
# Builds the fit split's replay for (keep, first, last) positions: in-loop compensation resumes it
# from states kept across decisions instead of re-running the pruned prefix.
ReplayFactory = Callable[[Sequence[int], int, int], PrefixReplay]


def split_windows(ids: torch.Tensor, config: CompensationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) windows: a quarter judges the projections, at most `max_heldout_samples`."""
    n = ids.shape[0]
    n_heldout = min(n - 1, max(1, round(config.heldout_fraction * n)), config.max_heldout_samples) if n >= 2 else 0
    return ids[: n - n_heldout], ids[n - n_heldout :]


def split_targets(
    model: nn.Module,
    layers: Collection[int],
    ids: torch.Tensor,
    config: CompensationConfig,
    originals: OriginalWeights,
    check_cancel: Callable[[], None] = lambda: None,
    heldout: bool = True,
) -> SplitTargets | None:
    """The original model's outputs at `layers` for both splits of `ids` (the held-out one only with
    `heldout`: it is streamed only to refit on all rows), computed once for many `compensate` calls
    on the same windows (in-loop compensation), or None over the cache budget."""
    dim = find_writer(find_layers(model).layers[0])[0].out_features
    if not target_cache_fits(ids.numel(), dim, len(layers) + 1, config.target_cache_mib):  # + 1: replay
        return None
    mb = config.micro_batch_size
    fit_ids, heldout_ids = split_windows(ids, config)
    fit = original_targets(model, layers, fit_ids, originals, mb, check_cancel)
    held = original_targets(model, layers, heldout_ids, originals, mb, check_cancel) if heldout else None
    return fit, held if heldout_ids.shape[0] else None


def cache_splits(
    model: nn.Module,
    keep: Sequence[int],
    usable: Sequence[int],
    targets: dict[int, int],
    splits: tuple[torch.Tensor, torch.Tensor],
    stream_heldout: bool,
    originals: OriginalWeights,
    config: CompensationConfig,
    check_cancel: Callable[[], None],
    known: SplitTargets | None = None,
    fit_replay: ReplayFactory | None = None,
) -> tuple[SplitCache | None, SplitCache | None]:
    """Per split (fit, held-out): targets of every placement (where streamed; taken from `known`
    when given) and the prefix replay, or None for an empty split or over budget."""
    layers = find_layers(model).layers
    dim = find_writer(layers[keep[usable[0]]])[0].out_features
    wanted = sorted({targets[p] for p in usable})
    total = sum(ids.numel() for ids in splits)
    if not target_cache_fits(total, dim, len(wanted) + 1, config.target_cache_mib):  # + 1: replayed states
        return None, None
    mb = config.micro_batch_size

    def build(split: int, streamed: bool) -> SplitCache | None:
        ids = splits[split]
        if ids.shape[0] == 0:
            return None
        targets_of_split = None
        if streamed:
            given = None if known is None else known[split]
            targets_of_split = given or original_targets(model, wanted, ids, originals, mb, check_cancel)
        if split == 0 and fit_replay is not None:
            return SplitCache(targets_of_split, fit_replay(keep, usable[0], usable[-1]))
        return SplitCache(targets_of_split, PrefixReplay(model, keep, ids, mb, usable[0], usable[-1], check_cancel))

    # Without a judge and without a refit on all rows, the held-out split is never run.
    return build(0, True), build(1, stream_heldout) if config.judged or stream_heldout else None


def compensate(
    model: nn.Module,
    keep: Sequence[int],
    ids: torch.Tensor,
    config: CompensationConfig,
    shifts: list[dict[str, Any]] | None = None,
    progress: Callable[[float, str], None] = lambda f, m: None,
    check_cancel: Callable[[], None] = lambda: None,
    only_layers: Collection[int] | None = None,
    originals: OriginalWeights | None = None,
    known_targets: SplitTargets | None = None,
    fit_replay: ReplayFactory | None = None,
) -> dict[str, Any]:
    """Fit and merge projection(s) into the kept layers of `model` (which still has all layers).

    Returns the JSON-serialisable compensation report; on rejection the weights are restored.
    Incremental use (in-loop compensation): `only_layers` limits the fit to those kept layers
    (original indices), leaving projections merged earlier elsewhere in place, and `originals`
    must then hold the unmerged writers of every block (the original model's targets);
    `known_targets` (from `split_targets` on the same `ids`) spares re-running the original model,
    and `fit_replay` builds the fit split's replay (used only where the targets are cached).
    """
    started = time.perf_counter()
    keep = sorted(keep)
    n_layers = len(find_layers(model).layers)
    fit_ids, heldout_ids = split_windows(ids, config)
    n_heldout = heldout_ids.shape[0]
    measured: Shifts = (
        shifts
        if shifts is not None
        else (lambda: measure_shift(model, keep, ids, config.micro_batch_size, check_cancel))
    )
    positions = choose_placements(keep, n_layers, measured, config.placement, config.max_projections)
    if only_layers is not None:
        positions = [p for p in positions if keep[p] in set(only_layers)]
    report: dict[str, Any] = {
        "enabled": True,
        "placement": config.placement,
        "ridge": config.ridge,
        "refine_steps": config.refine_steps,
        "fit_samples": int(fit_ids.shape[0]),
        "heldout_samples": int(heldout_ids.shape[0]),
        "compensation_tokens": int(ids.numel()),
        "projections": [],
        "kept": False,
    }
    layers = find_layers(model).layers
    usable = [p for p in positions if find_writer(layers[keep[p]]) is not None]
    if not usable:
        report["reason"] = "no placement with a known residual writer (down_proj)" if positions else "no drift"
        report["seconds"] = round(time.perf_counter() - started, 3)
        return report

    def full_loss(batch: torch.Tensor) -> float | None:
        if batch.shape[0] == 0:
            return None
        with layer_subset(model, keep):
            return lm_loss(model, batch, config.micro_batch_size)

    # Each projection is judged on its own: kept only if it lowers the held-out next-token loss
    # (the fit split when nothing could be held out), otherwise rolled back before the next one.
    judge_ids = heldout_ids if n_heldout else fit_ids
    targets = {position: target_index(keep, position, n_layers) for position in usable}
    if originals is None:
        originals = OriginalWeights([find_writer(layers[keep[p]])[0] for p in usable])
    keep_rows = config.max_tokens if config.refine_steps > 0 else 0
    with_heldout = bool(n_heldout) and config.refit_on_all
    cached = cache_splits(
        model,
        keep,
        usable,
        targets,
        (fit_ids, heldout_ids),
        with_heldout,
        originals,
        config,
        check_cancel,
        known_targets,
        fit_replay,
    )
    judge = cached[1] if n_heldout else cached[0]
    # The loss before any projection: from the replay's stored state when cached (no prefix re-run).
    loss_before = None
    if config.judged:
        loss_before = full_loss(judge_ids) if judge is None else judge.prefix.loss(judge_ids, config.micro_batch_size)
    current = loss_before

    def pruned_loss(position: int) -> float | None:
        """Loss on the judging split with the current weights; from the replay at `position` when cached."""
        if judge is None:
            return full_loss(judge_ids)
        judge.prefix.advance(position)
        return judge.prefix.loss(judge_ids, config.micro_batch_size)

    def stream(position: int, split: int) -> Capture:
        cache = cached[split]
        return stream_placement(
            model,
            keep,
            position,
            targets[position],
            (fit_ids, heldout_ids)[split],
            originals,
            config.micro_batch_size,
            keep_rows,
            check_cancel,
            targets=None if cache is None else cache.targets,
            prefix=None if cache is None else cache.prefix,
        )

    for step, position in enumerate(usable):
        check_cancel()
        progress(step / len(usable), f"fitting projection at layer {keep[position]}")
        writer, post_norm, writer_name = find_writer(layers[keep[position]])
        # Later placements see the pruned model with earlier (kept) projections already merged.
        fit = stream(position, 0)
        # The held-out rows' equations only serve the refit on all rows (and its report).
        heldout = stream(position, 1) if with_heldout else None
        projection = solve_captures([fit], post_norm, config)
        eye = torch.eye(projection.shape[0])
        entry = {
            "layer": keep[position],
            "position": position,
            "target_layer": targets[position],
            "weight": writer_name,
            "fit_tokens": int(fit.equations.rows),
            # In the fit's space: exact without a post-norm, linearised through it otherwise.
            "mse_before": fit.equations.mse(eye),
            "mse_after": fit.equations.mse(projection),
            "projection_distance_from_identity": float((projection.cpu() - eye).norm() / eye.norm()),
        }
        if heldout is not None:
            entry["heldout_mse_before"] = heldout.equations.mse(eye)
            entry["heldout_mse_after"] = heldout.equations.mse(projection)
        restore_writer = snapshot_linear(writer)
        merge_projection(writer, projection)
        if config.judged:
            candidate = pruned_loss(position)
            bar = None if current is None else current * (1.0 - config.min_improvement)
            accepted = candidate is not None and bar is not None and candidate < bar
        else:
            candidate, accepted = None, True
        entry.update({"loss_before": current, "loss_after": candidate, "kept": bool(accepted)})
        if accepted and heldout is not None and config.refit_on_all:
            # The held-out split has done its job (deciding); the final projection uses every row.
            projection = solve_captures([fit, heldout], post_norm, config)
            restore_writer()
            merge_projection(writer, projection)
            candidate = pruned_loss(position) if config.judged else None
            entry.update(
                {"refit_on_all_rows": int(fit.equations.rows + heldout.equations.rows), "loss_after_refit": candidate}
            )
        if accepted:
            current = candidate
        else:
            restore_writer()
        report["projections"].append(entry)

    progress(1.0, "compensation validated")
    kept_entries = [e for e in report["projections"] if e["kept"]]
    summary = kept_entries[0] if kept_entries else report["projections"][0]
    report.update(
        {
            "kept": bool(kept_entries),
            "layers": [e["layer"] for e in kept_entries],
            "tried_layers": [e["layer"] for e in report["projections"]],
            "judged_on": (
                ("heldout" if n_heldout else "fit (calibration has one sample, nothing held out)")
                if config.judged
                else "not judged (every projection kept)"
            ),
            "heldout_loss_before": loss_before if n_heldout else None,
            "heldout_loss_after": current if n_heldout else None,
            "fit_loss_before": None if n_heldout else loss_before,
            "fit_loss_after": None if n_heldout else current,
            "mse_before": summary["mse_before"],
            "mse_after": summary["mse_after"],
            "seconds": round(time.perf_counter() - started, 3),
        }
    )
    if "heldout_mse_before" in summary:
        report["heldout_mse_before"] = summary["heldout_mse_before"]
        report["heldout_mse_after"] = summary["heldout_mse_after"]
    return report
