"""Calibration batches: token-id tensors of shape [n_samples, seq_len] with a fixed seed."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import StoppingCriteria, StoppingCriteriaList

from workers.engine.types import CancelCheck, EngineError, JobCancelled, ProgressFn, never_cancel, no_progress


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
    stream = _token_stream(tokenizer, texts, seq_len)
    return _draw(stream, n_samples, seq_len, _bos(tokenizer), torch.Generator().manual_seed(seed))


def token_batches_with_holdout(
    tokenizer: Any, texts: list[str], n_samples: int, n_holdout: int, seq_len: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(calibration windows, held-out windows, whether the two share no token).

    With enough text all windows are disjoint (the calibration rows are then exactly
    `token_batches`'s); short text keeps its last fifth for the held-out rows; text too short even
    for that draws both from the whole stream, and says so.
    """
    calibration, heldout, _, disjoint = job_windows(tokenizer, texts, n_samples, n_holdout, 0, seq_len, seed)
    return calibration, heldout, disjoint


def job_windows(
    tokenizer: Any, texts: list[str], n_samples: int, n_holdout: int, n_extra: int, seq_len: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(calibration, held-out, extra, disjoint): `token_batches_with_holdout` plus up to `n_extra`
    further windows (compensation's own budget) that never overlap the held-out ones where the
    held-out rows are disjoint. The calibration and held-out rows do not depend on `n_extra`.
    """
    stream = _token_stream(tokenizer, texts, seq_len)
    bos = _bos(tokenizer)
    text_len = seq_len - 1 if bos is not None else seq_len
    generator = torch.Generator().manual_seed(seed)
    n_windows = stream.numel() // text_len
    if n_windows >= n_samples + n_holdout:
        # A prefix of one random order of the aligned windows: calibration, held-out, then extra.
        rows = _draw(stream, min(n_windows, n_samples + n_holdout + n_extra), seq_len, bos, generator)
        return rows[:n_samples], rows[n_samples : n_samples + n_holdout], rows[n_samples + n_holdout :], True
    cut = stream.numel() - max(text_len, stream.numel() // 5)
    if cut >= text_len:
        calibration = _draw(stream[:cut], n_samples, seq_len, bos, generator)
        heldout = _draw(stream[cut:], n_holdout, seq_len, bos, generator)
        return calibration, heldout, _draw(stream[:cut], n_extra, seq_len, bos, generator), True
    calibration = _draw(stream, n_samples, seq_len, bos, generator)
    heldout = _draw(stream, n_holdout, seq_len, bos, generator)
    return calibration, heldout, _draw(stream, n_extra, seq_len, bos, generator), False


# Seed offset of self-generated windows that only compensation fits on (other text than calibration).
_COMPENSATION_SEED_OFFSET = 104729


def compensation_batch(calibration: torch.Tensor, extra: torch.Tensor, n_windows: int) -> torch.Tensor:
    """Compensation's own windows: the calibration rows, then the extra ones, `n_windows` in all."""
    return torch.cat([calibration, extra.to(calibration.dtype)])[:n_windows]


def self_generated_compensation(
    model: Any, tokenizer: Any, calibration: torch.Tensor, n_windows: int, seed: int, **generate: Any
) -> torch.Tensor:
    """`compensation_batch` for self-generated calibration: the missing windows are sampled too
    (another seed; `generate` goes to `self_generated_batches`: progress, cancel, cache)."""
    n_extra = max(0, n_windows - calibration.shape[0])
    extra = calibration[:0]
    if n_extra:
        extra = self_generated_batches(
            model, tokenizer, n_extra, calibration.shape[1], seed=seed + _COMPENSATION_SEED_OFFSET, **generate
        )
    return compensation_batch(calibration, extra, n_windows)


def _token_stream(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
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
    return stream


def _bos(tokenizer: Any) -> int | None:
    # Tokenizers that start every text with BOS (Gemma) get BOS at the start of every window too:
    # such models behave badly on text without it.
    return tokenizer.bos_token_id if _adds_bos(tokenizer) else None


def _draw(stream: torch.Tensor, n_samples: int, seq_len: int, bos: int | None, generator: torch.Generator):
    """`n_samples` windows of `stream`: non-overlapping aligned ones when there are enough."""
    if n_samples == 0:
        return torch.empty((0, seq_len), dtype=torch.long)
    text_len = seq_len - 1 if bos is not None else seq_len
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


# Bump when the sampling recipe changes: cached tokens of an older recipe are then never reused.
SAMPLING_RECIPE = "topk50-t1.0-v2"
# Samples generated together in one `generate` call; bounds the KV cache (chunk x seq_len x layers).
DEFAULT_CHUNK_SIZE = 64


class _CancelAndReport(StoppingCriteria):
    """Stops `generate` at the next token once a cancel is asked for, and reports progress on a clock.

    `generate` calls this after every decoding step, so a cancel never waits for a whole sample.
    """

    def __init__(
        self, should_cancel: CancelCheck, report: Callable[[int], None], interval: float, prompt_len: int
    ) -> None:
        self.should_cancel = should_cancel
        self.report = report
        self.interval = interval
        self.prompt_len = prompt_len
        self.cancelled = False
        self._last = time.monotonic()

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.report(input_ids.shape[1] - self.prompt_len)
        self.cancelled = self.cancelled or self.should_cancel()
        return torch.full((input_ids.shape[0],), self.cancelled, dtype=torch.bool, device=input_ids.device)


def start_prompts(tokenizer: Any, n_samples: int, seed: int) -> torch.Tensor:
    """One seeded ordinary start token per sample (after BOS when the model has one)."""
    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids or [])
    vocab = [i for i in range(min(len(tokenizer), 10_000)) if i not in special]
    picks = torch.randint(0, len(vocab), (n_samples,), generator=generator)
    prompt = torch.tensor([[vocab[i]] for i in picks.tolist()], dtype=torch.long)
    if tokenizer.bos_token_id is not None:
        prompt = torch.cat([torch.full((n_samples, 1), tokenizer.bos_token_id, dtype=torch.long), prompt], dim=1)
    return prompt


def generation_cache_path(
    cache_dir: Path,
    model_key: str,
    seed: int,
    n_samples: int,
    seq_len: int,
    chunk: int,
    top_k: int = 50,
    temperature: float = 1.0,
) -> Path:
    """Where the tokens of one (model, seed, count, length, sampling) run are kept."""
    recipe = SAMPLING_RECIPE if (top_k, temperature) == (50, 1.0) else f"topk{top_k}-t{temperature:g}-v2"
    key = f"{model_key}|{recipe}|chunk={chunk}|seed={seed}|n={n_samples}|len={seq_len}"
    return cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def _load_cached(path: Path, n_samples: int, seq_len: int) -> torch.Tensor | None:
    try:
        tokens = load_file(path)["tokens"]
    except Exception:  # missing, truncated or foreign file: regenerate (and overwrite it)
        return None
    return tokens if tuple(tokens.shape) == (n_samples, seq_len) else None


def _store(path: Path, tokens: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"tokens": tokens.contiguous()}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent job reads either nothing or the whole file


@torch.no_grad()
def self_generated_batches(
    model: Any,
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    progress: ProgressFn = no_progress,
    should_cancel: CancelCheck = never_cancel,
    *,
    cache_dir: Path | None = None,
    model_key: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress_interval: float = 2.0,
    top_k: int = 50,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sample calibration text from the model itself (no data needed): [n_samples, seq_len] token ids.

    Each sample starts from a seeded ordinary token and is completed by top-k sampling at
    `temperature` (`top_k` 0: from the whole distribution). Samples are
    decoded together in batches of `chunk_size` with the KV cache; a cancel stops decoding at the
    next token. With `cache_dir` and `model_key`, the tokens of a (model, seed, count, length) run
    are stored and later jobs reuse them instead of sampling again.
    """
    if should_cancel():
        raise JobCancelled()
    cached_path = None
    if cache_dir is not None and model_key is not None:
        cached_path = generation_cache_path(
            cache_dir, model_key, seed, n_samples, seq_len, chunk_size, top_k, temperature
        )
        cached = _load_cached(cached_path, n_samples, seq_len)
        if cached is not None:
            progress("calibrating", 1.0, f"reusing {n_samples}x{seq_len} self-generated tokens (cached)")
            return cached
    device = next(model.parameters()).device
    prompts = start_prompts(tokenizer, n_samples, seed)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    total = n_samples * seq_len
    progress("calibrating", 0.0, f"sampling {n_samples}x{seq_len} tokens from the model")
    started = time.perf_counter()
    torch.manual_seed(seed)  # sampling draws from the global generator
    parts = []
    for first in range(0, n_samples, chunk_size):
        prompt = prompts[first : first + chunk_size].to(device)
        done_before = first * seq_len

        def report(new_tokens: int, rows: int = prompt.shape[0], base: int = done_before) -> None:
            done = base + rows * new_tokens
            rate = done / max(time.perf_counter() - started, 1e-9)
            progress("calibrating", done / total, f"sampled {done}/{total} tokens ({rate:.0f} tokens/s)")

        stop = _CancelAndReport(should_cancel, report, progress_interval, prompt.shape[1])
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=top_k,
            temperature=temperature,
            max_new_tokens=seq_len,
            min_new_tokens=seq_len,
            pad_token_id=pad,
            use_cache=True,
            stopping_criteria=StoppingCriteriaList([stop]),
        )
        if stop.cancelled:
            raise JobCancelled()
        parts.append(out[:, -seq_len:].cpu())
    tokens = torch.cat(parts)
    if cached_path is not None:
        _store(cached_path, tokens)
    progress("calibrating", 1.0, f"sampled {total} tokens in {time.perf_counter() - started:.1f} s")
    return tokens


def split_holdout(tokens: torch.Tensor, n_holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration rows, held-out rows): the last `n_holdout` rows are never given to a method."""
    return tokens[: tokens.shape[0] - n_holdout], tokens[tokens.shape[0] - n_holdout :]


def holdout_count(n_samples: int) -> int:
    """Held-out rows drawn beside `n_samples` calibration rows: a quarter, at least 2, at most 32."""
    return min(32, max(2, round(n_samples / 4)))
