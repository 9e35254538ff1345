"""Parameter counting, shared by reports, plans and evaluation."""

from __future__ import annotations

import torch


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters (tied weights counted once) and the count without embeddings / LM head."""
    seen: set[int] = set()
    total = 0
    embedding = 0
    embedding_ids = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            embedding_ids.add(id(module.weight))
    output = getattr(model, "get_output_embeddings", lambda: None)()
    if output is not None and getattr(output, "weight", None) is not None:
        embedding_ids.add(id(output.weight))
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if id(param) in embedding_ids:
            embedding += param.numel()
    return {"total": total, "without_embeddings": total - embedding}
