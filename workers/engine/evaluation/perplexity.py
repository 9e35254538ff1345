"""Perplexity on non-overlapping fixed-length segments (LLM-Pruner / SparseGPT protocol).

The token stream is cut into floor(n / seq_len) segments of seq_len tokens (the incomplete tail is
dropped); every segment is scored independently, so each predicts seq_len - 1 tokens. The result
is exp(mean NLL over all predicted tokens); with equal-length segments this equals LLM-Pruner's
exp(mean of per-segment mean losses).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from workers.engine.evaluation.modelio import model_device, split_model
from workers.engine.evaluation.scoring import wants_bos
from workers.engine.types import EngineError, ProgressFn, no_progress

# Logits are materialised for at most this many positions at once (positions × vocab floats).
_HEAD_CHUNK = 1024


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, targets.reshape(-1), reduction="none").double()


@torch.no_grad()
def _batch_nll(model: torch.nn.Module, segments: torch.Tensor) -> torch.Tensor:
    """Summed NLL of tokens 1..L-1 of each segment in a [B, L] batch, as a [B] float64 tensor."""
    split = split_model(model)
    targets = segments[:, 1:]
    if split is None:
        logits = model(input_ids=segments, use_cache=False).logits[:, :-1]
        return _token_nll(logits, targets).view(targets.shape).sum(dim=1).cpu()
    hidden = split.decoder(input_ids=segments, use_cache=False).last_hidden_state[:, :-1]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    parts = []
    for start in range(0, flat_hidden.shape[0], _HEAD_CHUNK):
        chunk = slice(start, start + _HEAD_CHUNK)
        parts.append(_token_nll(split.head(flat_hidden[chunk]), flat_targets[chunk]))
    return torch.cat(parts).view(targets.shape).sum(dim=1).cpu()


def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seq_len: int,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    stop: Callable[[torch.Tensor], bool] | None = None,
) -> dict:
    """Perplexity of a 1-D token stream on non-overlapping `seq_len` segments.

    Returns {"ppl", "nll" (mean per predicted token), "n_tokens" (predicted), "n_segments", "seq_len",
    "nll_stderr", "ppl_stderr", "segment_nll"}. The standard errors treat segments as the independent
    samples (tokens within a segment are correlated): nll_stderr = std(segment mean NLL) / sqrt(n),
    ppl_stderr = ppl * nll_stderr (delta method). `segment_nll` (mean NLL per segment) lets two
    models scored on the same text be compared pairwise, which is much tighter than either error.
    `progress(stage, fraction, message)` is called after every batch (it may raise to cancel).
    `stop(segment_nll so far)`, when given, is asked after every batch whether the rest can be
    skipped (a sequential test); the result then covers the segments scored (`complete` False).
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
    sums = []
    try:
        for start in range(0, n_segments, batch_size):
            sums.append(_batch_nll(model, segments[start : start + batch_size]))
            done = min(start + batch_size, n_segments)
            progress("evaluating", done / n_segments, f"perplexity@{seq_len}: {done}/{n_segments} segments")
            if stop is not None and done < n_segments and stop(torch.cat(sums) / (seq_len - 1)):
                break
    finally:
        model.train(was_training)
    per_segment = torch.cat(sums) / (seq_len - 1)
    scored = per_segment.numel()
    mean_nll = float(per_segment.mean())
    stderr = float(per_segment.std() / math.sqrt(scored)) if scored > 1 else 0.0
    result = {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "n_tokens": scored * (seq_len - 1),
        "n_segments": scored,
        "seq_len": seq_len,
        "nll_stderr": stderr,
        "ppl_stderr": math.exp(mean_nll) * stderr,
        "segment_nll": [round(float(v), 6) for v in per_segment],
    }
    if stop is not None:
        result["complete"] = scored == n_segments
    return result
