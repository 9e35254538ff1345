"""Running a causal LM as decoder + output head, so logits are computed only where needed.

The LM head (vocab × hidden) costs as much as several decoder layers on small models and its
output (tokens × vocab floats) dominates memory at long sequence lengths. Scoring needs logits at
a few positions only, so we run the decoder, pick positions, then apply the head. Whether this
split reproduces the model's own logits is checked once per model (some architectures scale or
cap logits in ways we do not know); if not, callers fall back to the full forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class SplitModel:
    decoder: torch.nn.Module
    head: Callable[[torch.Tensor], torch.Tensor]  # hidden [..., H] -> logits [..., V]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def _try_split(model: torch.nn.Module) -> SplitModel | None:
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    try:
        decoder, lm_head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or lm_head is None or decoder is model:
        return None
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head(hidden)
        if softcap:  # Gemma-2 style final logit soft-capping
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return SplitModel(decoder=decoder, head=head)


@torch.no_grad()
def split_model(model: torch.nn.Module) -> SplitModel | None:
    """Decoder + head of `model` if they reproduce its logits on a small probe, else None."""
    cached = getattr(model, "_slimforge_split_ok", None)
    split = _try_split(model)
    if split is None or cached is False:
        return None
    if cached is True:
        return split
    vocab = getattr(model.config, "vocab_size", 2)
    probe = torch.arange(1, 9, device=model_device(model)).remainder(vocab).unsqueeze(0)
    reference = model(input_ids=probe, use_cache=False).logits.float()
    try:
        hidden = split.decoder(input_ids=probe, use_cache=False).last_hidden_state
        ours = split.head(hidden).float()
    except (TypeError, AttributeError, RuntimeError):  # decoder with another calling convention
        ours = torch.empty(0)
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    ok = reference.shape == ours.shape and torch.allclose(reference, ours, atol=tol, rtol=tol)
    try:
        model._slimforge_split_ok = bool(ok)  # remember per model instance
    except AttributeError:
        pass
    return split if ok else None
