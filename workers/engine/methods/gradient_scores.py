"""Gradient-based layer scores from one forward+backward of the calibration batch.

Two families:
- residual scores: only activations need gradients (no weight gradients at all). With g = dL/dh_out
  and delta = h_out - h_in the block's residual contribution, removing the block moves the stream
  by -delta, so -g . delta is the first-order loss change of the removal.
- weight scores: gradients only on the decoder blocks' weights (never embeddings / LM head).

The calibration batch is processed in micro-batches (the loss of each is weighted by its token
share, so the gradients equal those of the whole batch); scores accumulate in fp32 on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch import nn

from workers.engine.hidden import BlockIO, forward_ids, micro_batches
from workers.engine.layers import find_layers, model_device

ResidualScore = Literal[
    "residual",
    "residual_signed",
    "residual_sum_abs",
    "grad_delta_norm",
    "residual_relative",
    "residual_fisher",
    "kl_fisher",
    "grad_influence",
    "fwd_bwd_influence",
]
WeightScore = Literal["grad_mean", "taylor", "taylor_sum"]
# The runtime lists are derived from the Literal types so the two can never disagree.
RESIDUAL_SCORES = get_args(ResidualScore)
WEIGHT_SCORES = get_args(WeightScore)


@contextmanager
def gradients_only_on(model: nn.Module, params: list[nn.Parameter]):
    """Temporarily let only `params` require gradients; restore every flag afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    chosen = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
            p.grad = None
        yield
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)


@contextmanager
def embeddings_require_grad(model: nn.Module):
    """Make the embedding output a leaf that requires grad, so activations get gradients even when
    no parameter does."""
    embedding = model.get_input_embeddings()
    handle = embedding.register_forward_hook(lambda module, args, out: out.detach().requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row 1 - cos(a, b); 0 where either row is zero (e.g. the gradient at a sequence's last
    position, which no loss term reaches), so such rows do not count as maximally turned."""
    distance = 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
    defined = (a.norm(dim=-1) > 0) & (b.norm(dim=-1) > 0)
    return torch.where(defined, distance, torch.zeros_like(distance))


def _reduce_residual(
    kind: str, g: torch.Tensor, delta: torch.Tensor, h_in: torch.Tensor, g_in: torch.Tensor | None, n_tokens: int
) -> float:
    """One block's contribution to its score for one micro-batch (tokens as rows, fp32).

    g is the gradient of the batch's *mean* loss; n_tokens * g approximates each token's own loss gradient.
    """
    if kind in ("grad_influence", "fwd_bwd_influence"):
        # How much the block turns the gradient flowing back through it (the backward twin of
        # ShortGPT's 1 - cos(h_in, h_out)); fwd_bwd adds the forward term itself.
        assert g_in is not None
        score = _cosine_distance(g_in, g)
        if kind == "fwd_bwd_influence":
            score = score + _cosine_distance(h_in, h_in + delta)
        return float(score.sum())
    dot = (g * delta).sum(dim=-1)
    if kind == "residual":
        return float(dot.abs().sum())
    if kind == "residual_signed":
        return float((-dot).sum())
    if kind == "residual_sum_abs":
        return float(dot.sum())  # absolute value taken after summing over all micro-batches
    if kind in ("residual_fisher", "kl_fisher"):
        # Second-order term with the empirical Fisher as the Hessian: 1/2 (per-token gradient . delta)^2.
        # The first-order term averages out near a minimum; this one does not.
        return float(0.5 * (dot * n_tokens).pow(2).sum())
    if kind == "grad_delta_norm":
        return float((g.norm(dim=-1) * delta.norm(dim=-1)).sum())
    if kind == "residual_relative":
        # First-order change relative to the stream size, so late (large-norm) layers are comparable.
        return float((dot.abs() * (delta.norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-6))).sum())
    raise ValueError(f"unknown residual score {kind!r}")


def sampled_label_loss(model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Next-token loss against labels drawn from the model's own predictions.

    Its gradient's outer product is an unbiased sample of the Fisher of the model's output
    distribution, so 1/2 (g . delta)^2 estimates KL(current || without the layer), which is what
    the data-label loss misses: near a trained model its first-order term is mostly noise.
    """
    logits = model(input_ids=batch.to(model_device(model)), use_cache=False).logits[:, :-1].float()
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
        labels = torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])
        del probs
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def weighted_micro_batches(
    ids: torch.Tensor, micro_batch_size: int, check_cancel: Callable[[], None]
) -> Iterator[tuple[torch.Tensor, float]]:
    """(micro-batch, its share of the predicted tokens): losses scaled by the share sum to the
    whole batch's mean loss, so the accumulated gradients equal those of one full-batch pass."""
    n_tokens = ids.shape[0] * (ids.shape[1] - 1)
    for batch in micro_batches(ids, micro_batch_size):
        check_cancel()
        yield batch, batch.shape[0] * (batch.shape[1] - 1) / n_tokens


def residual_scores(
    model: nn.Module,
    ids: torch.Tensor,
    kind: str,
    micro_batch_size: int,
    check_cancel: Callable[[], None] = lambda: None,
    on_backward: Callable[[], None] = lambda: None,
) -> list[float]:
    """Per block of the current model: a first-order estimate of the loss change of its removal."""
    n_layers = len(find_layers(model).layers)
    totals = [0.0] * n_layers
    n_tokens = ids.shape[0] * (ids.shape[1] - 1)
    generator = torch.Generator(device=model_device(model)).manual_seed(0)
    with gradients_only_on(model, []), embeddings_require_grad(model):
        for batch, share in weighted_micro_batches(ids, micro_batch_size, check_cancel):
            with BlockIO(model, keep_graph=True) as io:
                if kind == "kl_fisher":
                    loss = sampled_label_loss(model, batch, generator)
                else:
                    loss = forward_ids(model, batch, labels=True).loss
                (loss.float() * share).backward()
                on_backward()
            for i in range(n_layers):
                h_out = io.outputs[i]
                h_in = io.inputs[i].detach().float()
                g = h_out.grad.float()
                delta = h_out.detach().float() - h_in
                d = delta.shape[-1]
                grad_in = io.inputs[i].grad
                g_in = None if grad_in is None else grad_in.float().reshape(-1, d)
                totals[i] += _reduce_residual(
                    kind, g.reshape(-1, d), delta.reshape(-1, d), h_in.reshape(-1, d), g_in, n_tokens
                )
            del io, loss
    if kind == "residual_sum_abs":
        totals = [abs(t) for t in totals]
    positions = ids.numel()
    return [t / positions for t in totals]  # per-token means: readable, same ranking


def block_weights(block: nn.Module) -> list[nn.Parameter]:
    """The matrices of a block (norm vectors and biases excluded: they are tiny and scale-like)."""
    return [p for p in block.parameters() if p.ndim >= 2]


def weight_scores(
    model: nn.Module,
    ids: torch.Tensor,
    kind: str,
    micro_batch_size: int,
    check_cancel: Callable[[], None] = lambda: None,
    on_backward: Callable[[], None] = lambda: None,
) -> list[float]:
    """Per block: mean |dL/dW| (`grad_mean`), mean |W * dL/dW| (`taylor`) or its sum (`taylor_sum`)."""
    layers = find_layers(model).layers
    per_block = [block_weights(block) for block in layers]
    params = [p for block in per_block for p in block]
    with gradients_only_on(model, params):
        for batch, share in weighted_micro_batches(ids, micro_batch_size, check_cancel):
            out = forward_ids(model, batch, labels=True)
            (out.loss.float() * share).backward()
            on_backward()
            del out
        scores = []
        for block in per_block:
            total = 0.0
            count = 0
            for p in block:
                grad = p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                value = grad.abs() if kind == "grad_mean" else (grad * p.detach().float()).abs()
                total += float(value.sum())
                count += p.numel()
            scores.append(total if kind == "taylor_sum" else total / max(count, 1))
    return scores


def gradient_scores(
    model: nn.Module,
    ids: torch.Tensor,
    kind: str,
    micro_batch_size: int,
    check_cancel: Callable[[], None] = lambda: None,
    on_backward: Callable[[], None] = lambda: None,
) -> list[float]:
    if kind in RESIDUAL_SCORES:
        return residual_scores(model, ids, kind, micro_batch_size, check_cancel, on_backward)
    if kind in WEIGHT_SCORES:
        return weight_scores(model, ids, kind, micro_batch_size, check_cancel, on_backward)
    raise ValueError(f"unknown gradient score {kind!r}")
