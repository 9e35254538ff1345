"""Perplexity on non-overlapping fixed-length segments (LLM-Pruner / SparseGPT protocol).

The token stream is cut into floor(n / seq_len) segments of seq_len tokens (the incomplete tail is
dropped); every segment is scored independently, so each predicts seq_len - 1 tokens. The result
is exp(mean NLL over all predicted tokens); with equal-length segments this equals LLM-Pruner's
exp(mean of per-segment mean losses).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from workers.engine.evaluation.modelio import model_device, split_model
from workers.engine.evaluation.scoring import wants_bos
from workers.engine.types import EngineError, ProgressFn, no_progress

# Logits are materialised for at most this many positions at once (positions × vocab floats).
_HEAD_CHUNK = 1024


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()


@torch.no_grad()
def _batch_nll(model: torch.nn.Module, segments: torch.Tensor) -> float:
    """Summed NLL of tokens 1..L-1 of every segment in a [B, L] batch."""
    split = split_model(model)
    targets = segments[:, 1:]
    if split is None:
        logits = model(input_ids=segments, use_cache=False).logits[:, :-1]
        return _nll_sum(logits, targets)
    hidden = split.decoder(input_ids=segments, use_cache=False).last_hidden_state[:, :-1]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    total = 0.0
    for start in range(0, flat_hidden.shape[0], _HEAD_CHUNK):
        chunk = slice(start, start + _HEAD_CHUNK)
        total += _nll_sum(split.head(flat_hidden[chunk]), flat_targets[chunk])
    return total


def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seq_len: int,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
) -> dict:
    """Perplexity of a 1-D token stream on non-overlapping `seq_len` segments.

    Returns {"ppl", "nll" (mean per predicted token), "n_tokens" (predicted), "n_segments", "seq_len"}.
    `progress(stage, fraction, message)` is called after every batch (it may raise to cancel).
    """
    progress = progress or no_progress
    if input_ids.dim() != 1:
        raise ValueError("input_ids must be a 1-D tensor of token ids")
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    # Gemma models degrade badly without BOS: their segments are BOS + (seq_len - 1) text tokens.
    bos = getattr(model.config, "bos_token_id", None) if wants_bos(model) else None
    text_len = seq_len - 1 if bos is not None else seq_len
    n_segments = input_ids.numel() // text_len
    if n_segments == 0:
        raise EngineError(
            "text_too_short", f"Text has {input_ids.numel()} tokens, fewer than one segment of {seq_len}."
        )
    segments = input_ids[: n_segments * text_len].view(n_segments, text_len)
    if bos is not None:
        segments = torch.cat([torch.full((n_segments, 1), bos, dtype=segments.dtype), segments], dim=1)
    segments = segments.to(model_device(model))
    was_training = model.training
    model.eval()
    total_nll = 0.0
    try:
        for start in range(0, n_segments, batch_size):
            total_nll += _batch_nll(model, segments[start : start + batch_size])
            done = min(start + batch_size, n_segments)
            progress("evaluating", done / n_segments, f"perplexity@{seq_len}: {done}/{n_segments} segments")
    finally:
        model.train(was_training)
    n_tokens = n_segments * (seq_len - 1)
    mean_nll = total_nll / n_tokens
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "n_tokens": n_tokens,
        "n_segments": n_segments,
        "seq_len": seq_len,
    }
