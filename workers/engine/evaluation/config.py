"""The `evaluation` option of a job."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workers.engine.evaluation.tasks import TASKS, resolve_task_dir
from workers.engine.evaluation.texts import BUILTIN_TEXTS

MIN_SEQ_LEN, MAX_SEQ_LEN = 16, 8192
_DATASET_REF = re.compile(r"^dataset:[A-Za-z0-9_.\-]{1,128}$")


class EvaluationConfig(BaseModel):
    """What to measure before/after pruning. Every part is optional; defaults are cheap."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"perplexity": ["wikitext2"], "speed": False},
                {"perplexity": ["wikitext2", "ptb"], "tasks": ["arc_easy", "piqa"], "limit": 200, "speed": True},
                {"perplexity": ["dataset:ds_0123456789abcdef"], "seq_lens": [128, 512], "speed": False},
            ]
        },
    )

    perplexity: list[str] = Field(
        default_factory=list,
        description='Texts to measure perplexity on: "wikitext2", "ptb" or "dataset:<id>" (an uploaded dataset).',
    )
    seq_lens: list[int] = Field(
        default_factory=lambda: [128],
        description="Segment lengths for perplexity (128 = LLM-Pruner; 2048 = SparseGPT/SLEB), clipped to the "
        "model's context length.",
    )
    max_tokens: int | None = Field(
        default=32768, ge=16, description="Cap on tokens per perplexity text (None = whole text)."
    )
    tasks: list[str] = Field(default_factory=list, description=f"Zero-shot tasks, a subset of {', '.join(TASKS)}.")
    limit: int | None = Field(
        default=500, ge=1, description="Questions per task, a fixed-seed random sample (None = all)."
    )
    seed: int = Field(default=0, description="Seed of the per-task sample.")
    speed: bool = Field(
        default=True,
        description="Measure forward and generation tokens/s (a few seconds per model: about 1 s of forwards "
        "and a few short greedy generations, before and after pruning).",
    )

    @field_validator("perplexity")
    @classmethod
    def _check_texts(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in BUILTIN_TEXTS and not _DATASET_REF.match(name):
                raise ValueError(
                    f"unknown perplexity text {name!r}: use one of {', '.join(BUILTIN_TEXTS)} or 'dataset:<id>'"
                )
        if len(set(names)) != len(names):
            raise ValueError("perplexity texts must not repeat")
        return names

    @field_validator("seq_lens")
    @classmethod
    def _check_seq_lens(cls, values: list[int]) -> list[int]:
        if not values:
            raise ValueError("seq_lens must name at least one length")
        for value in values:
            if not MIN_SEQ_LEN <= value <= MAX_SEQ_LEN:
                raise ValueError(f"seq_len {value} is outside {MIN_SEQ_LEN}..{MAX_SEQ_LEN}")
        return sorted(set(values))

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, values: list[str]) -> list[str]:
        unknown = [v for v in values if v not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(TASKS)}")
        if len(set(values)) != len(values):
            raise ValueError("tasks must not repeat")
        return values


def catalogue(eval_data_dir: Path | None) -> dict[str, Any]:
    """What this server can evaluate: perplexity texts and zero-shot tasks, and which have their data."""
    root = Path(eval_data_dir).expanduser() if eval_data_dir is not None else None
    task_dir = resolve_task_dir(root) if root is not None else None
    return {
        "data_dir_configured": root is not None,
        "perplexity": [
            {"name": name, "available": root is not None and (root / path).is_file()}
            for name, path in BUILTIN_TEXTS.items()
        ]
        + [{"name": "dataset:<id>", "available": True, "description": "an uploaded dataset (POST /v1/datasets)"}],
        "tasks": [{"name": task, "available": task_dir is not None and (task_dir / task).is_dir()} for task in TASKS],
        "seq_len_range": [MIN_SEQ_LEN, MAX_SEQ_LEN],
        "schema": EvaluationConfig.model_json_schema(),
    }
