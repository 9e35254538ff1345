"""Calibration batches: token-id tensors of shape [n_samples, seq_len] with a fixed seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from workers.engine.types import CancelCheck, EngineError, ProgressFn, never_cancel, no_progress


def read_calibration_file(path: Path) -> list[str]:
    """Read texts from a .txt file (whole file, one text) or .jsonl file (`text` field per line)."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EngineError("invalid_dataset", f"Line {number} of {path.name} is not JSON: {exc}") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise EngineError("invalid_dataset", f"Line {number} of {path.name} has no string 'text' field.")
            texts.append(record["text"])
        return texts
    return [raw]


def token_batches(tokenizer: Any, texts: list[str], n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Tokenise `texts` as one stream and draw `n_samples` windows of `seq_len` tokens.

    Windows start at seeded random offsets (non-overlapping where the stream is long enough), so
    the same data, seed and sizes always give the same batch.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None and len(texts) > 1:
            ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.long)
    if stream.numel() < seq_len:
        raise EngineError(
            "calibration_too_small",
            f"Calibration data has {stream.numel()} tokens; at least seq_len={seq_len} are needed.",
        )
    # Tokenizers that start every text with BOS (Gemma) get BOS at the start of every window too:
    # such models behave badly on text without it.
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    text_len = seq_len - 1 if bos is not None else seq_len
    generator = torch.Generator().manual_seed(seed)
    n_windows = stream.numel() // text_len
    if n_windows >= n_samples:
        # Non-overlapping windows, chosen at random among all aligned windows.
        starts = torch.randperm(n_windows, generator=generator)[:n_samples] * text_len
    else:
        starts = torch.randint(0, stream.numel() - text_len + 1, (n_samples,), generator=generator)
    windows = torch.stack([stream[s : s + text_len] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((n_samples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


@torch.no_grad()
def self_generated_batches(
    model: Any,
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    progress: ProgressFn = no_progress,
    should_cancel: CancelCheck = never_cancel,
) -> torch.Tensor:
    """Sample calibration text from the model itself (no data needed).

    Each sample starts from a different seeded start token drawn from the vocabulary's ordinary
    tokens and is completed by top-k sampling; all samples are generated as one batch.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    special = set(tokenizer.all_special_ids or [])
    vocab = [i for i in range(min(len(tokenizer), 10_000)) if i not in special]
    picks = torch.randint(0, len(vocab), (n_samples,), generator=generator)
    prompt = torch.tensor([[vocab[i]] for i in picks.tolist()], dtype=torch.long, device=device)
    if tokenizer.bos_token_id is not None:
        bos = torch.full((n_samples, 1), tokenizer.bos_token_id, dtype=torch.long, device=device)
        prompt = torch.cat([bos, prompt], dim=1)
    if should_cancel():
        from workers.engine.types import JobCancelled

        raise JobCancelled()
    progress("calibrating", 0.0, f"sampling {n_samples}x{seq_len} tokens from the model")
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        top_k=50,
        temperature=1.0,
        max_new_tokens=seq_len,
        min_new_tokens=seq_len,
        pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
    )
    progress("calibrating", 1.0, None)
    return out[:, -seq_len:].cpu()
