"""Request and response bodies of the v1 API (pydantic v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from app.inputs import TEXT_WHITESPACE, control_char_error, non_finite_error
from app.models import Job
from workers.engine.evaluation.config import EvaluationConfig
from workers.engine.recovery.config import RecoveryConfig
from workers.engine.search.target import QualityTarget


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SelfGeneratedCalibration(Strict):
    source: Literal["self_generated"]
    n_samples: int = Field(8, ge=1, le=1024)
    seq_len: int = Field(128, ge=8, le=8192)


class DatasetCalibration(Strict):
    source: Literal["dataset"]
    dataset_id: str = Field(min_length=1, max_length=64)
    n_samples: int = Field(8, ge=1, le=1024)
    seq_len: int = Field(128, ge=8, le=8192)


Calibration = Annotated[SelfGeneratedCalibration | DatasetCalibration, Field(discriminator="source")]

# The job's `evaluation` as OpenAPI shows it (EvaluationConfig's fields and examples); the body is
# validated against that model in jobs_service, so its errors carry the `invalid_evaluation` code.
Evaluation = Annotated[
    dict[str, Any] | None,
    WithJsonSchema({"anyOf": [EvaluationConfig.model_json_schema(), {"type": "null"}]}),
]


class JobCreate(Strict):
    model: str = Field(min_length=1, max_length=512, examples=["builtin:smollm2-135m"])
    method: str = Field("gradmap", min_length=1, max_length=64)
    target_sparsity: float | None = Field(
        None, gt=0.0, lt=1.0, description="fraction to remove, strictly between 0 and 1 (or give `target`)"
    )
    target: QualityTarget | None = Field(
        None, description="instead of target_sparsity: the most-pruned model within this quality budget"
    )
    recovery: RecoveryConfig | None = Field(None, description="heal the pruned model (distillation or next-token)")
    sparsity_basis: Literal["layers", "parameters"] = "layers"
    calibration: Calibration = Field(default_factory=lambda: SelfGeneratedCalibration(source="self_generated"))
    options: dict[str, Any] = Field(default_factory=dict, description="method options (see GET /v1/methods)")
    evaluation: Evaluation = Field(
        None, description="what to evaluate before and after pruning (catalogue: GET /v1/evaluations)"
    )
    artifact_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the saved weights; auto = the source checkpoint's (bf16 for the built-ins)"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    webhook_url: AnyHttpUrl | None = Field(None, description="POSTed the job JSON, signed, when it ends")

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, data: Any) -> Any:
        # Ids and URLs must be printable; free-form option/evaluation strings may keep whitespace.
        if isinstance(data, dict):
            for key, value in data.items():
                allow = TEXT_WHITESPACE if key in ("options", "evaluation") else frozenset()
                found = control_char_error(str(key), where=f"{key!s} (key)") or control_char_error(value, allow, key)
                if found:
                    raise ValueError(f"{found}; use printable characters only")
                if found := non_finite_error(value, key):
                    raise ValueError(f"{found}; use finite numbers")
        return data

    @model_validator(mode="after")
    def _one_size(self) -> JobCreate:
        if (self.target_sparsity is None) == (self.target is None):
            raise ValueError("give exactly one of target_sparsity and target")
        return self


class JobError(BaseModel):
    code: str
    message: str
    stage: str | None


class JobOut(BaseModel):
    id: str
    status: str
    stage: str | None
    progress: float
    model: str
    method: str
    target_sparsity: float | None
    target: dict[str, Any] | None
    recovery: dict[str, Any] | None
    sparsity_basis: str
    calibration: dict[str, Any]
    options: dict[str, Any]
    evaluation: dict[str, Any] | None
    seed: int
    attempts: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    error: JobError | None
    result: dict[str, Any] | None
    artifact_id: str | None

    @classmethod
    def from_row(cls, job: Job) -> JobOut:
        spec = job.spec
        error = (
            JobError(code=job.error_code, message=job.error_message or "", stage=job.error_stage)
            if job.error_code
            else None
        )
        return cls(
            id=job.id,
            status=job.status,
            stage=job.stage,
            progress=round(job.progress, 2),
            model=job.model,
            method=job.method,
            target_sparsity=spec.get("target_sparsity", job.target_sparsity),
            target=spec.get("target"),
            recovery=spec.get("recovery"),
            sparsity_basis=job.sparsity_basis,
            calibration=spec.get("calibration", {}),
            options=spec.get("options", {}),
            evaluation=spec.get("evaluation"),
            seed=spec.get("seed", 0),
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            heartbeat_at=job.heartbeat_at,
            error=error,
            result=job.result,
            artifact_id=job.artifact_id,
        )


class DryRunOut(BaseModel):
    dry_run: Literal[True]
    model: str
    method: str
    plan: dict[str, Any]
    spec: dict[str, Any]


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class EventOut(BaseModel):
    seq: int
    created_at: datetime
    kind: str
    stage: str | None
    message: str
    data: dict[str, Any] | None


class DatasetOut(BaseModel):
    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    n_texts: int
    n_chars: int
    created_at: datetime


class ArtifactFileOut(BaseModel):
    path: str
    size_bytes: int
    sha256: str
    url: str


class ArtifactOut(BaseModel):
    id: str
    job_id: str
    total_bytes: int
    created_at: datetime
    files: list[ArtifactFileOut]
    archive_url: str
