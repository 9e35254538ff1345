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
   of the original hidden state that writer must produce. X^T X and X^T T are summed micro-batch
   by micro-batch in one streaming pass (`NormalEquations`), so the fit can use many more tokens
   than scoring (its own `compensation_samples` budget) without memory growing with the rows;
   optionally refine P with a few Adam steps on the exact objective (needed when a norm follows
   the writer, as in Gemma's sandwich norms; only this keeps rows, at most `max_tokens`),
4. merge P into that writer's weight (W <- P^T W, b <- b P), so the saved model has no extra module,
5. validate on a held-out split of the compensation tokens and keep the change only if the
   held-out next-token loss improves; a kept projection is then refitted on all rows (fit +
   held-out normal equations added).

The original model is the same module with all layers; the pruned one is a `layer_subset` view, so
no weights are copied.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from workers.engine.hidden import BlockIO, capture_forward, forward_ids, lm_loss, micro_batches
from workers.engine.layers import find_layers, layer_subset
from workers.engine.replay import PrefixReplay

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
    max_tokens: int = 16384  # rows kept in memory for the Adam refinement only; the solve streams all
    min_improvement: float = 0.0  # relative held-out loss drop a projection needs to be kept
    refit_on_all: bool = True  # once a projection passed the held-out check, refit it on fit + held-out rows
    micro_batch_size: int = 4
    # The original model's targets of every placement are captured in one pass, and the pruned
    # model's state is replayed from placement to placement (`PrefixReplay`), while they fit in this
    # many MiB (rows x d x 4 bytes per target layer, plus one for the state); beyond it each
    # placement re-runs both prefixes, so memory stays bounded.
    target_cache_mib: float = 1024.0


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


class NormalEquations:
    """Running sums of a least-squares fit Y ~= X P: X^T X, X^T Y, sum ||Y||^2 and the row count.

    Adding rows micro-batch by micro-batch gives the same solve as stacking them all, while memory
    stays two d x d float64 matrices however many tokens the fit sees.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.cross = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.target_sq = 0.0
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x64, y64 = x.double(), y.double()
        self.gram += x64.T @ x64
        self.cross += x64.T @ y64
        self.target_sq += float(y64.pow(2).sum())
        self.rows += x.shape[0]

    def __add__(self, other: NormalEquations) -> NormalEquations:
        out = NormalEquations(self.gram.shape[0], self.gram.device)
        out.gram, out.cross = self.gram + other.gram, self.cross + other.cross
        out.target_sq, out.rows = self.target_sq + other.target_sq, self.rows + other.rows
        return out

    def solve(self, ridge: float) -> torch.Tensor:
        """argmin_P ||X P - Y||^2 + lam ||P - I||^2, lam = ridge * trace(X^T X) / d (float64 solve)."""
        d = self.gram.shape[0]
        lam = ridge * float(self.gram.diagonal().mean()) if ridge > 0 else 0.0
        eye = torch.eye(d, dtype=torch.float64, device=self.gram.device)
        return torch.linalg.solve(self.gram + lam * eye, self.cross + lam * eye).float()

    def mse(self, projection: torch.Tensor) -> float:
        """mean over rows and channels of (X P - Y)^2, from the sums alone."""
        if self.rows == 0:
            return float("nan")
        p = projection.to(self.gram).double()
        sq = float((p * (self.gram @ p)).sum()) - 2.0 * float((p * self.cross).sum()) + self.target_sq
        return max(sq, 0.0) / (self.rows * self.gram.shape[0])


def ridge_projection(x: torch.Tensor, t: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_P ||x P - t||^2 + lam ||P - I||^2 with lam = ridge * trace(x^T x)/d (float64 solve)."""
    equations = NormalEquations(x.shape[1], x.device)
    equations.add(x, t)
    return equations.solve(ridge)


def apply_writer(z: torch.Tensor, projection: torch.Tensor, post_norm: nn.Module | None) -> torch.Tensor:
    out = z @ projection
    if post_norm is None:
        return out
    return post_norm(out.to(next(post_norm.parameters()).dtype)).float()


def design_rows(
    z: torch.Tensor, residual: torch.Tensor, target: torch.Tensor, post_norm: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, Y) of the linear fit Y ~= X P that makes residual + post_norm(z P) ~= target."""
    want = target - residual
    if post_norm is None:
        return z, want
    # Linearise the norm around P = I: post_norm(zP) ~= g * (z/rms(z)) P, exact at P = I.
    gain = norm_gain(post_norm, z.shape[1], z.device)
    gain = torch.where(gain.abs() < 1e-3, torch.full_like(gain, 1e-3), gain)
    eps = getattr(post_norm, "eps", getattr(post_norm, "variance_epsilon", 1e-6))
    rms = z.pow(2).mean(dim=-1, keepdim=True).add(eps).sqrt()
    return z / rms, want / gain


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
    projection = ridge_projection(*design_rows(z, residual, target, post_norm), ridge)
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


class OriginalWeights:
    """Unmerged copies of residual writers, swapped in by reference while the original model runs.

    The pruned model is a view of the same modules, so once a projection is merged the original
    model would see it too; streaming captures need the original's targets after every merge.
    """

    def __init__(self, writers: Sequence[nn.Linear]) -> None:
        self._saved = [
            (w, w.weight.detach().clone(), None if w.bias is None else w.bias.detach().clone()) for w in writers
        ]

    @classmethod
    def of_model(cls, model: nn.Module) -> OriginalWeights:
        """Every block's residual writer (blocks without a known writer are never merged into)."""
        return cls([found[0] for block in find_layers(model).layers if (found := find_writer(block))])

    @torch.no_grad()
    def restore(self, writers: Collection[nn.Linear] | None = None) -> None:
        """Copy the original values back into `writers` (default: all) -- undoes their merges."""
        for writer, weight, bias in self._saved:
            if writers is None or any(writer is w for w in writers):
                writer.weight.copy_(weight)
                if bias is not None:
                    writer.bias.copy_(bias)

    @contextmanager
    def active(self) -> Iterator[None]:
        current = [(w, w.weight.data, None if w.bias is None else w.bias.data) for w, _, _ in self._saved]
        for writer, weight, bias in self._saved:
            writer.weight.data = weight
            if bias is not None:
                writer.bias.data = bias
        try:
            yield
        finally:
            for writer, weight, bias in current:
                writer.weight.data = weight
                if bias is not None:
                    writer.bias.data = bias


@torch.no_grad()
def _original_rows(model: nn.Module, layer: int, batch: torch.Tensor) -> torch.Tensor:
    with BlockIO(model, [layer], inputs=False, stop_after=layer) as io:
        capture_forward(model, batch)
    return _token_rows(io.outputs[layer])


@torch.no_grad()
def _pruned_rows(
    model: nn.Module, keep: Sequence[int], position: int, batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, residual) token rows of the pruned model at a placement: block output = residual + f(z)."""
    writer, post_norm, _ = find_writer(find_layers(model).layers[keep[position]])
    captured: list[torch.Tensor] = []
    handle = writer.register_forward_hook(lambda m, a, out: captured.append(out.detach().float()))
    try:
        with layer_subset(model, keep), BlockIO(model, [position], inputs=False, stop_after=position) as pruned:
            capture_forward(model, batch)
    finally:
        handle.remove()
    z = _token_rows(captured[-1])
    contribution = apply_writer(z, torch.eye(z.shape[1], device=z.device), post_norm)
    return z, _token_rows(pruned.outputs[position]) - contribution


@torch.no_grad()
def _replayed_rows(
    prefix: PrefixReplay, index: int, position: int, writer: nn.Linear, post_norm: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_pruned_rows` for micro-batch `index`, from the replayed state entering the placement."""
    captured: list[torch.Tensor] = []
    handle = writer.register_forward_hook(lambda m, a, out: captured.append(out.detach().float()))
    try:
        output = prefix.run_block(index, position)
    finally:
        handle.remove()
    z = _token_rows(captured[-1])
    contribution = apply_writer(z, torch.eye(z.shape[1], device=z.device), post_norm)
    return z, _token_rows(output) - contribution


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
        cache.append({layer: _token_rows(io.outputs[layer]) for layer in wanted})
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


def _solve(captures: Sequence[Capture], post_norm: nn.Module | None, config: CompensationConfig) -> torch.Tensor:
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


@dataclass
class SplitCache:
    """What one split's streaming passes reuse: the original targets and the replayed pruned prefix."""

    targets: TargetCache | None  # None where this split is never streamed (only judged)
    prefix: PrefixReplay


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
) -> tuple[SplitCache | None, SplitCache | None]:
    """Per split (fit, held-out): targets of every placement (where streamed) and the prefix replay,
    or None for an empty split or over budget."""
    layers = find_layers(model).layers
    dim = find_writer(layers[keep[usable[0]]])[0].out_features
    wanted = sorted({targets[p] for p in usable})
    total = sum(ids.numel() for ids in splits)
    if not target_cache_fits(total, dim, len(wanted) + 1, config.target_cache_mib):  # + 1: replayed states
        return None, None
    mb = config.micro_batch_size

    def build(ids: torch.Tensor, streamed: bool) -> SplitCache | None:
        if ids.shape[0] == 0:
            return None
        return SplitCache(
            original_targets(model, wanted, ids, originals, mb, check_cancel) if streamed else None,
            PrefixReplay(model, keep, ids, mb, usable[0], usable[-1], check_cancel),
        )

    return build(splits[0], True), build(splits[1], stream_heldout)


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
) -> dict[str, Any]:
    """Fit and merge projection(s) into the kept layers of `model` (which still has all layers).

    Returns the JSON-serialisable compensation report; on rejection the weights are restored.
    Incremental use (in-loop compensation): `only_layers` limits the fit to those kept layers
    (original indices), leaving projections merged earlier elsewhere in place, and `originals`
    must then hold the unmerged writers of every block (the original model's targets).
    """
    started = time.perf_counter()
    keep = sorted(keep)
    n_layers = len(find_layers(model).layers)
    n = ids.shape[0]
    n_heldout = min(n - 1, max(1, round(config.heldout_fraction * n))) if n >= 2 else 0
    fit_ids, heldout_ids = ids[: n - n_heldout], ids[n - n_heldout :]
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
    loss_before = full_loss(judge_ids)
    current = loss_before
    targets = {position: target_index(keep, position, n_layers) for position in usable}
    if originals is None:
        originals = OriginalWeights([find_writer(layers[keep[p]])[0] for p in usable])
    keep_rows = config.max_tokens if config.refine_steps > 0 else 0
    with_heldout = bool(n_heldout) and config.refit_on_all
    cached = cache_splits(
        model, keep, usable, targets, (fit_ids, heldout_ids), with_heldout, originals, config, check_cancel
    )
    judge = cached[1] if n_heldout else cached[0]

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
        projection = _solve([fit], post_norm, config)
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
        candidate = pruned_loss(position)
        bar = None if current is None else current * (1.0 - config.min_improvement)
        accepted = candidate is not None and bar is not None and candidate < bar
        entry.update({"loss_before": current, "loss_after": candidate, "kept": bool(accepted)})
        if accepted and heldout is not None and config.refit_on_all:
            # The held-out split has done its job (deciding); the final projection uses every row.
            projection = _solve([fit, heldout], post_norm, config)
            restore_writer()
            merge_projection(writer, projection)
            candidate = pruned_loss(position)
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
    if "heldout_mse_before" in summary:
        report["heldout_mse_before"] = summary["heldout_mse_before"]
        report["heldout_mse_after"] = summary["heldout_mse_after"]
    return report
