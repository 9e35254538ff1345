"""Importance of coupled groups from gradients of the next-token loss (LLM-Pruner, §3.2).

Per weight w with gradient g of the mean calibration loss and diagonal empirical Fisher F
(mean over samples of per-sample g²), removing w changes the loss by about -g·w + ½·F·w².
- element1: Σ |g·w| over the group's weights (first-order Taylor, LLM-Pruner's default)
- element2: Σ |g·w - ½·F·w²| (second order with the diagonal Fisher as Hessian)
- vector:   |Σ g·w| per row / column of each projection (a channel removed at once, first order),
            summed over a head's head_dim channels
- l2:       ‖w‖₂ per member (magnitude baseline, no gradients)
- random:   seeded uniform scores (baseline, no gradients)
Each member of a group (e.g. q rows, k rows, v rows, o columns) gives one number; the group's
importance aggregates them by sum, max, prod or last (the last member: o_proj / down_proj).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from workers.engine.width.groups import BlockGeometry, decoder_layers

Importance = Literal["element1", "element2", "vector", "l2", "random"]
Aggregation = Literal["sum", "max", "prod", "last"]
GRADIENT_IMPORTANCE = ("element1", "element2", "vector")


@dataclass
class LinearStats:
    """fp32 gradient of the mean loss (and Fisher diagonal) for one Linear's weight and bias."""

    grad_w: torch.Tensor
    grad_b: torch.Tensor | None
    fisher_w: torch.Tensor | None = None
    fisher_b: torch.Tensor | None = None


@dataclass
class LayerScores:
    """Scores of one block: `attention` per KV group (or per query head), `mlp` per channel."""

    attention: torch.Tensor
    mlp: torch.Tensor


def target_linears(model: nn.Module, layer_indices: list[int]) -> dict[tuple[int, str], nn.Linear]:
    layers = decoder_layers(model)
    found: dict[tuple[int, str], nn.Linear] = {}
    for i in layer_indices:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            found[(i, name)] = getattr(layers[i].self_attn, name)
        for name in ("gate_proj", "up_proj", "down_proj"):
            found[(i, name)] = getattr(layers[i].mlp, name)
    return found


def collect_gradients(
    model: nn.Module,
    calibration: torch.Tensor,
    linears: dict[tuple[int, str], nn.Linear],
    *,
    batch_size: int,
    fisher: bool,
    on_step: Callable[[int, int], None],
) -> dict[tuple[int, str], LinearStats]:
    """Accumulate, in fp32, gradients of the mean next-token loss w.r.t. the target Linears.

    Only those weights require grad during the passes (embeddings etc. stay frozen, saving memory);
    the previous requires_grad flags are restored afterwards. The Fisher needs per-sample
    gradients, so `fisher=True` runs one sample per backward pass.
    """
    device = next(model.parameters()).device
    n = calibration.shape[0]
    step = 1 if fisher else max(1, batch_size)
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    stats = {
        key: LinearStats(
            grad_w=torch.zeros(lin.weight.shape, dtype=torch.float32, device=device),
            grad_b=None if lin.bias is None else torch.zeros(lin.bias.shape, dtype=torch.float32, device=device),
            fisher_w=torch.zeros(lin.weight.shape, dtype=torch.float32, device=device) if fisher else None,
            fisher_b=None
            if lin.bias is None or not fisher
            else torch.zeros(lin.bias.shape, dtype=torch.float32, device=device),
        )
        for key, lin in linears.items()
    }
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for lin in linears.values():
            for p in lin.parameters():
                p.requires_grad_(True)
        model.eval()  # deterministic (no dropout); gradients flow regardless
        total_steps = (n + step - 1) // step
        for k, start in enumerate(range(0, n, step)):
            batch = calibration[start : start + step].to(device)
            loss = model(input_ids=batch, labels=batch).loss
            # The sum of per-batch gradients weighted by batch share is the gradient of the mean loss.
            (loss.float() * (batch.shape[0] / n)).backward()
            with torch.no_grad():
                for key, lin in linears.items():
                    s = stats[key]
                    g = lin.weight.grad.float()
                    s.grad_w += g
                    if s.fisher_w is not None:
                        # g is this sample's gradient scaled by 1/n; F = mean of squared per-sample grads.
                        s.fisher_w += (g * n).pow(2) / n
                    if lin.bias is not None:
                        gb = lin.bias.grad.float()
                        s.grad_b += gb
                        if s.fisher_b is not None:
                            s.fisher_b += (gb * n).pow(2) / n
                    lin.weight.grad = None
                    if lin.bias is not None:
                        lin.bias.grad = None
            on_step(k + 1, total_steps)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return stats


def _salience(lin: nn.Linear, stats: LinearStats | None, importance: Importance) -> tuple[torch.Tensor, ...]:
    """Element-wise salience of weight and bias (bias may be None)."""
    w = lin.weight.detach().float()
    b = None if lin.bias is None else lin.bias.detach().float()
    if importance == "l2":
        return w.pow(2), None if b is None else b.pow(2)
    assert stats is not None
    sw = w * stats.grad_w
    sb = None if b is None else b * stats.grad_b
    if importance == "element1":
        return sw.abs(), None if sb is None else sb.abs()
    if importance == "element2":
        sw = (sw - 0.5 * stats.fisher_w * w.pow(2)).abs()
        if sb is not None:
            sb = (sb - 0.5 * stats.fisher_b * b.pow(2)).abs()
        return sw, sb
    return sw, sb  # vector: signed, made absolute per row / column


def _rows(lin: nn.Linear, stats: LinearStats | None, importance: Importance) -> torch.Tensor:
    sw, sb = _salience(lin, stats, importance)
    rows = sw.sum(dim=1)
    rows = rows if sb is None else rows + sb
    return rows.abs() if importance == "vector" else rows


def _cols(lin: nn.Linear, stats: LinearStats | None, importance: Importance) -> torch.Tensor:
    sw, _ = _salience(lin, stats, importance)  # an output bias is not tied to any input column
    cols = sw.sum(dim=0)
    return cols.abs() if importance == "vector" else cols


def _finish(member: torch.Tensor, importance: Importance) -> torch.Tensor:
    return member.sqrt() if importance == "l2" else member


def aggregate(members: list[torch.Tensor], how: Aggregation) -> torch.Tensor:
    stacked = torch.stack([m.double() for m in members])
    if how == "sum":
        return stacked.sum(0)
    if how == "max":
        return stacked.max(0).values
    if how == "prod":
        return stacked.prod(0)
    return stacked[-1]


def layer_scores(
    layer: nn.Module,
    geom: BlockGeometry,
    stats: dict[str, LinearStats] | None,
    importance: Importance,
    aggregation: Aggregation,
    prune_kv_heads: bool,
    generator: torch.Generator,
) -> LayerScores:
    """Group scores of one block (higher = more important)."""
    n_attn_units = geom.num_kv_heads if prune_kv_heads else geom.num_heads
    if importance == "random":
        return LayerScores(
            attention=torch.rand(n_attn_units, generator=generator, dtype=torch.float64),
            mlp=torch.rand(geom.intermediate_size, generator=generator, dtype=torch.float64),
        )
    attn, mlp = layer.self_attn, layer.mlp

    def get(name: str) -> LinearStats | None:
        return None if stats is None else stats[name]

    hd, n_kv, n_rep = geom.head_dim, geom.num_kv_heads, geom.n_rep
    q = _rows(attn.q_proj, get("q_proj"), importance).view(geom.num_heads, hd).sum(-1)
    o = _cols(attn.o_proj, get("o_proj"), importance).view(geom.num_heads, hd).sum(-1)
    if prune_kv_heads:
        k = _rows(attn.k_proj, get("k_proj"), importance).view(n_kv, hd).sum(-1)
        v = _rows(attn.v_proj, get("v_proj"), importance).view(n_kv, hd).sum(-1)
        members = [q.view(n_kv, n_rep).sum(-1), k, v, o.view(n_kv, n_rep).sum(-1)]
    else:
        members = [q, o]
    attention = aggregate([_finish(m, importance) for m in members], aggregation)
    channel_members = [
        _rows(mlp.gate_proj, get("gate_proj"), importance),
        _rows(mlp.up_proj, get("up_proj"), importance),
        _cols(mlp.down_proj, get("down_proj"), importance),
    ]
    mlp_scores = aggregate([_finish(m, importance) for m in channel_members], aggregation)
    return LayerScores(attention=attention, mlp=mlp_scores)
