"""Zero-shot multiple-choice accuracy (acc and length-normalised acc_norm) on the built-in tasks."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from workers.engine.evaluation.modelio import model_device
from workers.engine.evaluation.scoring import loglikelihoods
from workers.engine.evaluation.tasks import MCItem, check_tasks, load_task
from workers.engine.types import ProgressFn, no_progress


def _argmax(values: Sequence[float]) -> int:
    # First index wins ties, like numpy.argmax in lm-eval.
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _stderr(hits: list[int]) -> float:
    # Sample standard error of the mean, as lm-eval reports it.
    n = len(hits)
    if n < 2:
        return 0.0
    mean = sum(hits) / n
    return math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n)


def score_items(items: Sequence[MCItem], loglik: Sequence[Sequence[float]], per_item: bool = False) -> dict:
    """acc / acc_norm of items given each choice's summed log-likelihood; with `per_item`, also each
    item's 0/1 outcomes (`hits`, `hits_norm`), so two models scored on the same items can be paired."""
    hits, hits_norm = [], []
    for item, lls in zip(items, loglik, strict=True):
        hits.append(int(_argmax(lls) == item.gold))
        hits_norm.append(int(_argmax([ll / n for ll, n in zip(lls, item.norm_lengths, strict=True)]) == item.gold))
    n = len(items)
    scored = {
        "acc": sum(hits) / n if n else float("nan"),
        "acc_norm": sum(hits_norm) / n if n else float("nan"),
        "n": n,
        "acc_stderr": _stderr(hits),
        "acc_norm_stderr": _stderr(hits_norm),
    }
    return scored | ({"hits": hits, "hits_norm": hits_norm} if per_item else {})


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    data_dir: Path,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
    max_batch_tokens: int | None = None,
    per_item: bool = False,
) -> dict[str, dict]:
    """{task: {"acc", "acc_norm", "n", "acc_stderr", "acc_norm_stderr", "seconds"}} for each task.

    `data_dir` is the directory holding the task folders (or the shared data root with `eval/`).
    `limit` scores a fixed-seed random sample of that many items per task. `batch_size` caps the
    questions per forward pass, `max_batch_tokens` the padded tokens per pass (default: 4096 on CPU,
    where larger batches gain nothing, 32768 on accelerators).
    `progress(stage, fraction, message)` is called after every forward pass (it may raise to cancel).
    `per_item` adds every item's 0/1 outcomes (benchmarks pair two models on them).
    """
    progress = progress or no_progress
    check_tasks(tasks)
    if max_batch_tokens is None:
        max_batch_tokens = 4096 if model_device(model).type == "cpu" else 32768
    loaded = {task: load_task(task, Path(data_dir), limit, seed) for task in tasks}
    total = sum(len(items) for items in loaded.values()) or 1
    done = 0
    results: dict[str, dict] = {}
    for task, items in loaded.items():
        started = time.perf_counter()

        def on_batch(n: int, task: str = task) -> None:
            nonlocal done
            done += n
            progress("evaluating", done / total, f"{task}: {done}/{total} questions")

        lls = loglikelihoods(
            model,
            tokenizer,
            [item.requests for item in items],
            max_rows=batch_size,
            max_tokens=max_batch_tokens,
            on_batch=on_batch,
        )
        results[task] = score_items(items, lls, per_item) | {"seconds": round(time.perf_counter() - started, 2)}
    return results
