"""Projection compensation for layer pruning (GradMAP stage 2, usable after any layer selector).

After a selector has chosen the layers to drop, the pruned model's hidden states drift away from
the original's. We
1. measure the drift per kept layer on calibration data (relative to the hidden-state norm),
2. pick where to correct it: by default (`around_cut`) the kept layers right before and right
   after each removed block, each tried in forward order (the DESIGN trial found the layer after a
   cut to work, unlike "largest absolute shift near the end"; trying both sides measured best,
   docs/benchmarks/layer-pruning.md),
3. solve one d x d projection P in closed form,
       P = argmin ||X P - T||^2 + lam ||P - I||^2  =>  (X^T X + lam I) P = X^T T + lam I,
   where X is the output of the placement layer's last residual writer (`down_proj`) and T the part
   of the original hidden state that writer must produce; optionally refine P with a few Adam steps
   on the exact objective (needed when a norm follows the writer, as in Gemma's sandwich norms),
4. merge P into that writer's weight (W <- P^T W, b <- b P), so the saved model has no extra module,
5. validate on a held-out split of the calibration batch and keep the change only if the held-out
   next-token loss improves; a kept projection is then refitted on all calibration rows (the fit
   is data-starved: a d x d solve from a few hundred tokens).

The original model is the same module with all layers; the pruned one is a `layer_subset` view, so
no weights are copied.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from workers.engine.hidden import BlockIO, capture_forward, forward_ids, lm_loss, micro_batches
from workers.engine.layers import find_layers, layer_subset

Placement = Literal["after_cut", "before_cut", "around_cut", "max_relative_shift", "max_shift"]

# Last linear map of a block whose output is added to the residual stream, and the norm that some
# architectures (Gemma-2/3, OLMo-2) put between it and the residual add.
_WRITER_NAMES = ("mlp.down_proj", "mlp.fc2", "feed_forward.w2", "mlp.c_proj", "mlp.dense_4h_to_h")
_POST_NORM_NAMES = ("post_feedforward_layernorm",)


@dataclass
class CompensationConfig:
    placement: Placement = "around_cut"
    max_projections: int = 8
    ridge: float = 1.0  # lam = ridge * trace(X^T X) / d, so it is scale free
    refine_steps: int = 0
    refine_lr: float = 1e-4
    heldout_fraction: float = 0.25
    max_tokens: int = 16384
    min_improvement: float = 0.0  # relative held-out loss drop a projection needs to be kept
    refit_on_all: bool = True  # once a projection passed the held-out check, refit it on fit + held-out rows
    micro_batch_size: int = 4


# ---------------------------------------------------------------------------------------------
# Measuring the drift


def _token_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1]).float()


@torch.no_grad()
def original_outputs(model: nn.Module, batch: torch.Tensor, last: int | None = None) -> dict[int, torch.Tensor]:
    """Outputs of the blocks 0..last (default: all) of the unpruned model for one micro-batch, fp32 rows."""
    with BlockIO(model, None if last is None else range(last + 1), inputs=False, stop_after=last) as io:
        capture_forward(model, batch)
    return {i: _token_rows(h) for i, h in io.outputs.items()}


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
            pruned = _token_rows(io.outputs[position])
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


def choose_placements(
    keep: Sequence[int], n_layers: int, shifts: list[dict[str, Any]], placement: Placement, max_projections: int
) -> list[int]:
    """Kept-layer positions (in the pruned numbering) that receive a projection, in forward order."""
    keep = sorted(keep)
    removed = sorted(set(range(n_layers)) - set(keep))
    if not removed:
        return []
    if placement in ("max_relative_shift", "max_shift"):
        key = "shift" if placement == "max_relative_shift" else "abs_shift"
        # Only layers at or after the first cut can have drifted.
        candidates = [row for row in shifts if row["layer"] > removed[0]]
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
        by_shift = sorted(positions, key=lambda p: -shifts[p]["shift"])[:max_projections]
        positions = sorted(by_shift)
    return sorted(positions)


def target_index(keep: Sequence[int], position: int, n_layers: int) -> int:
    """Original layer whose output the pruned model should reproduce after kept position `position`.

    That is the original stream just before the next kept layer: the placement absorbs every
    removed layer between it and the next kept one.
    """
    keep = sorted(keep)
    return keep[position + 1] - 1 if position + 1 < len(keep) else n_layers - 1


# ---------------------------------------------------------------------------------------------
# The writer a projection is merged into


def find_writer(block: nn.Module) -> tuple[nn.Linear, nn.Module | None, str] | None:
    """(last residual writer Linear, norm applied after it or None, its name), or None if unknown."""
    for name in _WRITER_NAMES:
        try:
            module = block.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            norms = [getattr(block, n, None) for n in _POST_NORM_NAMES]
            post = next((m for m in norms if isinstance(m, nn.Module)), None)
            return module, post, name
    return None


def snapshot_linear(linear: nn.Linear) -> Callable[[], None]:
    """Copy a Linear's weight (and bias); the returned function puts them back."""
    weight = linear.weight.detach().clone()
    bias = None if linear.bias is None else linear.bias.detach().clone()

    @torch.no_grad()
    def restore() -> None:
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)

    return restore


@torch.no_grad()
def merge_projection(writer: nn.Linear, projection: torch.Tensor) -> None:
    """Make `writer(x)` return `writer(x) @ P`: W <- P^T W, b <- b P (computed in fp32)."""
    p = projection.to(device=writer.weight.device, dtype=torch.float32)
    writer.weight.copy_((p.T @ writer.weight.float()).to(writer.weight.dtype))
    if writer.bias is not None:
        writer.bias.copy_((writer.bias.float() @ p).to(writer.bias.dtype))


# ---------------------------------------------------------------------------------------------
# Solving for P


def norm_gain(post_norm: nn.Module, dim: int, device: torch.device) -> torch.Tensor:
    """Per-channel gain g of an RMS-style norm: f(u) = g * u / rms(u); f(ones) = g since rms(ones)=1."""
    with torch.no_grad():
        ones = torch.ones(1, dim, device=device, dtype=next(post_norm.parameters()).dtype)
        return post_norm(ones).float().reshape(-1)


def ridge_projection(x: torch.Tensor, t: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_P ||x P - t||^2 + lam ||P - I||^2 with lam = ridge * trace(x^T x)/d (float64 solve)."""
    x64 = x.double()
    t64 = t.double()
    d = x64.shape[1]
    gram = x64.T @ x64
    lam = ridge * float(gram.diagonal().mean()) if ridge > 0 else 0.0
    eye = torch.eye(d, dtype=torch.float64, device=x64.device)
    lhs = gram + lam * eye
    rhs = x64.T @ t64 + lam * eye
    return torch.linalg.solve(lhs, rhs).float()


def apply_writer(z: torch.Tensor, projection: torch.Tensor, post_norm: nn.Module | None) -> torch.Tensor:
    out = z @ projection
    if post_norm is None:
        return out
    return post_norm(out.to(next(post_norm.parameters()).dtype)).float()


def fit_projection(
    z: torch.Tensor,
    residual: torch.Tensor,
    target: torch.Tensor,
    post_norm: nn.Module | None,
    ridge: float,
    refine_steps: int = 0,
    refine_lr: float = 1e-4,
) -> torch.Tensor:
    """P such that residual + post_norm(z P) ~= target (rows are tokens)."""
    want = target - residual
    if post_norm is None:
        projection = ridge_projection(z, want, ridge)
    else:
        # Linearise the norm around P = I: post_norm(zP) ~= g * (z/rms(z)) P, exact at P = I.
        gain = norm_gain(post_norm, z.shape[1], z.device)
        gain = torch.where(gain.abs() < 1e-3, torch.full_like(gain, 1e-3), gain)
        eps = getattr(post_norm, "eps", getattr(post_norm, "variance_epsilon", 1e-6))
        rms = z.pow(2).mean(dim=-1, keepdim=True).add(eps).sqrt()
        projection = ridge_projection(z / rms, want / gain, ridge)
    if refine_steps > 0:
        projection = refine_projection(z, residual, target, post_norm, projection, ridge, refine_steps, refine_lr)
    return projection


def refine_projection(
    z: torch.Tensor,
    residual: torch.Tensor,
    target: torch.Tensor,
    post_norm: nn.Module | None,
    start: torch.Tensor,
    ridge: float,
    steps: int,
    lr: float,
) -> torch.Tensor:
    """A few Adam steps on mean ||residual + f(zP) - target||^2 + lam/n ||P - I||^2, keeping the best."""
    projection = start.clone().requires_grad_(True)
    eye = torch.eye(start.shape[0], device=start.device)
    scale = float(target.pow(2).mean()) or 1.0
    lam = ridge * float(z.pow(2).sum(dim=0).mean()) / z.shape[0]
    optimiser = torch.optim.Adam([projection], lr=lr)
    best = (float("inf"), start)

    def objective() -> torch.Tensor:
        fit = (residual + apply_writer(z, projection, post_norm) - target).pow(2).mean() / scale
        return fit + lam * (projection - eye).pow(2).mean() / scale

    # Only P is trained: the norm's own weights must not collect gradients.
    norm_params = list(post_norm.parameters()) if post_norm is not None else []
    flags = [p.requires_grad for p in norm_params]
    try:
        for p in norm_params:
            p.requires_grad_(False)
        for _ in range(steps + 1):
            optimiser.zero_grad()
            loss = objective()
            value = float(loss.detach())
            if value < best[0]:
                best = (value, projection.detach().clone())
            loss.backward()
            optimiser.step()
    finally:
        for p, flag in zip(norm_params, flags, strict=True):
            p.requires_grad_(flag)
    return best[1]


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


# ---------------------------------------------------------------------------------------------
# One placement: capture, fit, merge


@torch.no_grad()
def capture_reference(
    model: nn.Module,
    layer_indices: Sequence[int],
    ids: torch.Tensor,
    micro_batch_size: int,
    max_tokens: int,
    check_cancel: Callable[[], None],
) -> dict[int, torch.Tensor]:
    """Original-model outputs of `layer_indices`, at most `max_tokens` rows each (before any merge)."""
    wanted = sorted(set(layer_indices))
    parts: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    rows = 0
    for batch in micro_batches(ids, micro_batch_size):
        if rows >= max_tokens:
            break
        check_cancel()
        with BlockIO(model, wanted, inputs=False, stop_after=wanted[-1]) as io:
            capture_forward(model, batch)
        for i in wanted:
            parts[i].append(_token_rows(io.outputs[i]))
        rows += batch.numel()
    return {i: torch.cat(chunks)[:max_tokens] for i, chunks in parts.items()}


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
    """(z, residual) token rows of the pruned model at a placement: block output = residual + f(z)."""
    block = find_layers(model).layers[keep[position]]
    writer, post_norm, _ = find_writer(block)
    zs, residuals = [], []
    rows = 0
    for batch in micro_batches(ids, micro_batch_size):
        if rows >= max_tokens:
            break
        check_cancel()
        captured: list[torch.Tensor] = []
        handle = writer.register_forward_hook(lambda m, a, out, store=captured: store.append(out.detach().float()))
        try:
            with layer_subset(model, keep), BlockIO(model, [position], inputs=False, stop_after=position) as pruned:
                capture_forward(model, batch)
        finally:
            handle.remove()
        z = _token_rows(captured[-1])
        contribution = apply_writer(z, torch.eye(z.shape[1], device=z.device), post_norm)
        zs.append(z)
        residuals.append(_token_rows(pruned.outputs[position]) - contribution)
        rows += z.shape[0]
    return torch.cat(zs)[:max_tokens], torch.cat(residuals)[:max_tokens]


def compensate(
    model: nn.Module,
    keep: Sequence[int],
    ids: torch.Tensor,
    config: CompensationConfig,
    shifts: list[dict[str, Any]] | None = None,
    progress: Callable[[float, str], None] = lambda f, m: None,
    check_cancel: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Fit and merge projection(s) into the kept layers of `model` (which still has all layers).

    Returns the JSON-serialisable compensation report; on rejection the weights are restored.
    """
    started = time.perf_counter()
    keep = sorted(keep)
    n_layers = len(find_layers(model).layers)
    n = ids.shape[0]
    n_heldout = min(n - 1, max(1, round(config.heldout_fraction * n))) if n >= 2 else 0
    fit_ids, heldout_ids = ids[: n - n_heldout], ids[n - n_heldout :]
    if shifts is None:
        shifts = measure_shift(model, keep, ids, config.micro_batch_size, check_cancel)
    positions = choose_placements(keep, n_layers, shifts, config.placement, config.max_projections)
    report: dict[str, Any] = {
        "enabled": True,
        "placement": config.placement,
        "ridge": config.ridge,
        "refine_steps": config.refine_steps,
        "fit_samples": int(fit_ids.shape[0]),
        "heldout_samples": int(heldout_ids.shape[0]),
        "projections": [],
        "kept": False,
    }
    layers = find_layers(model).layers
    usable = [p for p in positions if find_writer(layers[keep[p]]) is not None]
    if not usable:
        report["reason"] = "no placement with a known residual writer (down_proj)" if positions else "no drift"
        report["seconds"] = round(time.perf_counter() - started, 3)
        return report

    def pruned_loss(batch: torch.Tensor) -> float | None:
        if batch.shape[0] == 0:
            return None
        with layer_subset(model, keep):
            return lm_loss(model, batch, config.micro_batch_size)

    # Each projection is judged on its own: kept only if it lowers the held-out next-token loss
    # (the fit split when nothing could be held out), otherwise rolled back before the next one.
    judge_ids = heldout_ids if n_heldout else fit_ids
    loss_before = pruned_loss(judge_ids)
    current = loss_before
    # The original model shares its blocks with the pruned view: capture every target before merging.
    targets = {position: target_index(keep, position, n_layers) for position in usable}
    fit_reference = capture_reference(
        model, list(targets.values()), fit_ids, config.micro_batch_size, config.max_tokens, check_cancel
    )
    heldout_reference = (
        capture_reference(
            model, list(targets.values()), heldout_ids, config.micro_batch_size, config.max_tokens, check_cancel
        )
        if n_heldout
        else None
    )
    for step, position in enumerate(usable):
        check_cancel()
        progress(step / len(usable), f"fitting projection at layer {keep[position]}")
        target_layer = targets[position]
        writer, post_norm, writer_name = find_writer(layers[keep[position]])
        # Later placements see the pruned model with earlier (kept) projections already merged.
        z, residual = capture_pruned(
            model, keep, position, fit_ids, config.micro_batch_size, config.max_tokens, check_cancel
        )
        target = fit_reference[target_layer]
        heldout = None
        if heldout_reference is not None:
            hz, hr = capture_pruned(
                model, keep, position, heldout_ids, config.micro_batch_size, config.max_tokens, check_cancel
            )
            heldout = (hz, hr, heldout_reference[target_layer])
        projection = fit_projection(
            z, residual, target, post_norm, config.ridge, config.refine_steps, config.refine_lr
        )
        eye = torch.eye(z.shape[1], device=z.device)
        with torch.no_grad():
            entry = {
                "layer": keep[position],
                "position": position,
                "target_layer": target_layer,
                "weight": writer_name,
                "fit_tokens": int(z.shape[0]),
                "mse_before": mse(residual + apply_writer(z, eye, post_norm), target),
                "mse_after": mse(residual + apply_writer(z, projection, post_norm), target),
                "projection_distance_from_identity": float((projection - eye).norm() / eye.norm()),
            }
            if heldout is not None:
                hz, hr, ht = heldout
                entry["heldout_mse_before"] = mse(hr + apply_writer(hz, eye, post_norm), ht)
                entry["heldout_mse_after"] = mse(hr + apply_writer(hz, projection, post_norm), ht)
        restore_writer = snapshot_linear(writer)
        merge_projection(writer, projection)
        candidate = pruned_loss(judge_ids)
        bar = None if current is None else current * (1.0 - config.min_improvement)
        accepted = candidate is not None and bar is not None and candidate < bar
        entry.update({"loss_before": current, "loss_after": candidate, "kept": bool(accepted)})
        if accepted and heldout is not None and config.refit_on_all:
            # The held-out split has done its job (deciding); the final projection uses every row,
            # which matters with a few hundred calibration tokens per d x d solve.
            hz, hr, ht = heldout
            projection = fit_projection(
                torch.cat([z, hz]), torch.cat([residual, hr]), torch.cat([target, ht]), post_norm,
                config.ridge, config.refine_steps, config.refine_lr,
            )
            restore_writer()
            merge_projection(writer, projection)
            candidate = pruned_loss(judge_ids)
            entry.update({"refit_on_all_rows": int(z.shape[0] + hz.shape[0]), "loss_after_refit": candidate})
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
            "judged_on": "heldout" if n_heldout else "fit (calibration has one sample, nothing held out)",
            "heldout_loss_before": loss_before if n_heldout else None,
            "heldout_loss_after": current if n_heldout else None,
            "fit_loss_before": None if n_heldout else loss_before,
            "fit_loss_after": None if n_heldout else current,
            "mse_before": summary["mse_before"],
            "mse_after": summary["mse_after"],
            "seconds": round(time.perf_counter() - started, 3),
        }
    )
    if n_heldout:
        report["heldout_mse_before"] = summary["heldout_mse_before"]
        report["heldout_mse_after"] = summary["heldout_mse_after"]
    return report
