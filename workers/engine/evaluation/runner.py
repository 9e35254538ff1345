"""Run everything an EvaluationConfig asks for, with one progress scale and cancel checks."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from workers.engine.evaluation.config import EvaluationConfig
from workers.engine.evaluation.modelio import max_positions
from workers.engine.evaluation.perplexity import perplexity
from workers.engine.evaluation.speed import speed as measure_speed
from workers.engine.evaluation.tasks import load_task
from workers.engine.evaluation.zero_shot import zero_shot
from workers.engine.params import count_parameters
from workers.engine.types import CancelCheck, EngineError, JobCancelled, ProgressFn, never_cancel, no_progress

STAGE = "evaluating"


def tokenize_text(tokenizer, text: str, max_tokens: int | None) -> torch.Tensor:
    """1-D token ids of a whole text (no special tokens), capped at `max_tokens`."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


class _Progress:
    """Maps each part's own 0..1 progress onto its slice of the whole run, checking for cancel."""

    def __init__(self, progress: ProgressFn, should_cancel: CancelCheck, weights: list[float]) -> None:
        self._progress, self._cancel = progress, should_cancel
        total = sum(weights) or 1.0
        self._starts, acc = [], 0.0
        for w in weights:
            self._starts.append((acc / total, w / total))
            acc += w
        self._part = 0

    def check(self) -> None:
        if self._cancel():
            raise JobCancelled()

    def part(self, index: int) -> ProgressFn:
        start, width = self._starts[index]

        def report(stage: str, fraction: float, message: str | None = None) -> None:
            self.check()  # cancel between batches
            self._progress(STAGE, min(1.0, start + width * fraction), message)

        return report


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    config: EvaluationConfig,
    *,
    texts: dict[str, str],
    data_dir: Path | None,
    progress: ProgressFn | None = None,
    should_cancel: CancelCheck | None = None,
    batch_size: int = 8,
) -> dict:
    """Parameter counts, perplexity per text and length, zero-shot tasks and speed, as one JSON dict.

    `texts` maps each name in `config.perplexity` to its text (the caller resolves built-in names
    and uploaded datasets). `data_dir` holds the zero-shot task folders (needed only with tasks).
    `progress("evaluating", fraction, message)` is called after every batch; JobCancelled is
    raised when `should_cancel()` turns True between batches.
    """
    missing = [name for name in config.perplexity if name not in texts]
    if missing:
        raise EngineError("eval_text_missing", f"No text given for perplexity set(s): {', '.join(missing)}.")
    result = run_evaluation(
        model,
        tokenizer,
        texts={name: texts[name] for name in config.perplexity},
        seq_lens=config.seq_lens,
        max_tokens=config.max_tokens,
        tasks=config.tasks,
        limit=config.limit,
        seed=config.seed,
        measure_speed_too=config.speed,
        data_dir=data_dir,
        progress=progress,
        should_cancel=should_cancel,
        batch_size=batch_size,
    )
    result["config"] = config.model_dump(mode="json")
    return result


def run_evaluation(
    model: torch.nn.Module,
    tokenizer,
    *,
    texts: dict[str, str],
    seq_lens: list[int],
    max_tokens: int | None,
    tasks: list[str],
    limit: int | None,
    seed: int,
    measure_speed_too: bool,
    data_dir: Path | None,
    progress: ProgressFn | None = None,
    should_cancel: CancelCheck | None = None,
    batch_size: int = 8,
    task_batch_size: int = 32,
) -> dict:
    """The work behind `evaluate`, for callers with already-validated inputs (e.g. the CLI)."""
    progress = progress or no_progress
    should_cancel = should_cancel or never_cancel
    if tasks and data_dir is None:
        raise EngineError("eval_data_missing", "Zero-shot tasks need a data directory; none is configured.")

    limit_len = max_positions(model)
    lengths = sorted({min(s, limit_len) if limit_len else s for s in seq_lens})
    token_streams = {name: tokenize_text(tokenizer, text, max_tokens) for name, text in texts.items()}
    # Weights ~ tokens to run, so the progress bar moves at a roughly even pace.
    weights = [float(stream.numel()) for stream in token_streams.values() for _ in lengths]
    if tasks:
        n_questions = sum(len(load_task(t, data_dir, limit, seed)) for t in tasks)
        weights.append(n_questions * 150.0)
    if measure_speed_too:
        weights.append(2000.0)
    tracker = _Progress(progress, should_cancel, weights)
    tracker.check()

    started = time.perf_counter()
    result: dict = {"parameters": count_parameters(model), "perplexity": {}, "tasks": {}}
    timings: dict[str, float] = {}
    part = 0
    for name, stream in token_streams.items():
        t0 = time.perf_counter()
        result["perplexity"][name] = {}
        for seq_len in lengths:
            scored = perplexity(
                model, stream, seq_len, batch_size=max(1, batch_size * 128 // seq_len), progress=tracker.part(part)
            )
            scored.pop("segment_nll")  # per-segment values are for paired benchmark comparisons only
            result["perplexity"][name][str(seq_len)] = scored
            part += 1
        timings[f"perplexity:{name}"] = round(time.perf_counter() - t0, 2)
    if tasks:
        t0 = time.perf_counter()
        result["tasks"] = zero_shot(
            model, tokenizer, tasks, data_dir, limit, seed, batch_size=task_batch_size, progress=tracker.part(part)
        )
        part += 1
        accs = [r["acc"] for r in result["tasks"].values()]
        result["tasks_mean_acc"] = sum(accs) / len(accs)
        timings["zero_shot"] = round(time.perf_counter() - t0, 2)
    if measure_speed_too:
        tracker.check()
        t0 = time.perf_counter()
        result["speed"] = measure_speed(model, tokenizer)
        tracker.part(part)(STAGE, 1.0, "speed measured")
        timings["speed"] = round(time.perf_counter() - t0, 2)
    timings["total"] = round(time.perf_counter() - started, 2)
    result["timings_s"] = timings
    return result
