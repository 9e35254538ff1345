"""The `target` option of a job: a quality budget instead of a sparsity."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class QualityTarget(BaseModel):
    """Find the most-pruned model whose quality stays within this budget."""

    model_config = ConfigDict(extra="forbid")

    max_perplexity_ratio: float | None = Field(
        None, gt=1.0, le=1000.0, description="Largest allowed perplexity / dense perplexity on `perplexity_set`."
    )
    perplexity_set: str = Field(
        "wikitext2", description='Text the budget is measured on: "wikitext2", "ptb" or "dataset:<id>".'
    )
    min_zero_shot_accuracy: float | None = Field(
        None, gt=0.0, lt=1.0, description="Smallest allowed mean zero-shot accuracy over `tasks` (instead of ppl)."
    )
    tasks: list[str] = Field(default_factory=list, description="Zero-shot tasks for min_zero_shot_accuracy.")
    limit: int = Field(200, ge=1, le=100_000, description="Questions per task at each probe.")
    eval_tokens: int = Field(8192, ge=256, le=10_000_000, description="Perplexity tokens scored at each probe.")
    seq_len: int = Field(128, ge=16, le=8192, description="Perplexity segment length.")
    max_sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="Most-pruned candidate searched.")
    sparsity_step: float = Field(0.05, gt=0.0, lt=1.0, description="Grid step of width methods (parameters).")
    full_curve: bool = Field(
        False, description="Probe every candidate (the whole size/quality curve) instead of a binary search."
    )
    predict: bool = Field(
        True,
        description=(
            "Methods whose selection holds a compensated model after each decision (GradMAP with in-loop "
            "compensation) measure it at every size as they go, and exact probes start at the predicted answer. "
            "Off: probes gallop up from one layer. The published model is always an exact probe's."
        ),
    )
    confirm_next: bool = Field(
        False,
        description=(
            "With predictions: also compensate and measure the size past the answer when its prediction, scaled by "
            "the prediction's error at the answer's exact probe, already misses the budget by more than its standard "
            "error. Off (default): that probe is skipped, so a right prediction costs one probe; the answer can then "
            "be one layer smaller than the galloping search's, when the scaled prediction errs by more than its "
            "standard error near the budget. On: the answer is exactly the galloping search's, usually at two probes."
        ),
    )
    probe_compensation_samples: int = Field(
        0,
        ge=0,
        le=4096,
        description=(
            "0 (default): every probe compensates like a single job, on all its compensation windows. N > 0 (layer "
            "methods): probes fit on the first N windows only, and the chosen size is refitted on all of them and "
            "measured again; the refit is published if it meets the budget, else the probe's model. Faster (about "
            "10 % of a search with N=32 of 128), but a size whose cheap probe just misses while its full fit would "
            "pass is not chosen. Ignored with recovery."
        ),
    )

    @field_validator("perplexity_set")
    @classmethod
    def _known_text(cls, name: str) -> str:
        from workers.engine.evaluation import EvaluationConfig

        EvaluationConfig(perplexity=[name])  # same names as the evaluation option
        return name

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from workers.engine.evaluation import EvaluationConfig

        EvaluationConfig(tasks=tasks)
        return tasks

    @model_validator(mode="after")
    def _one_budget(self) -> QualityTarget:
        if (self.max_perplexity_ratio is None) == (self.min_zero_shot_accuracy is None):
            raise ValueError("give exactly one of max_perplexity_ratio and min_zero_shot_accuracy")
        if self.min_zero_shot_accuracy is not None and not self.tasks:
            raise ValueError("min_zero_shot_accuracy needs at least one task in `tasks`")
        return self

    @property
    def metric(self) -> str:
        return "perplexity_ratio" if self.max_perplexity_ratio is not None else "zero_shot_accuracy"

    def meets(self, value: float) -> bool:
        if self.max_perplexity_ratio is not None:
            return value <= self.max_perplexity_ratio
        assert self.min_zero_shot_accuracy is not None
        return value >= self.min_zero_shot_accuracy

    def budget(self) -> str:
        if self.max_perplexity_ratio is not None:
            return f"perplexity <= {self.max_perplexity_ratio}x dense on {self.perplexity_set}"
        return f"mean zero-shot accuracy >= {self.min_zero_shot_accuracy} on {', '.join(self.tasks)}"
