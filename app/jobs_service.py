"""Job creation and state changes shared by the API and the workers."""

from __future__ import annotations

import hashlib
import json
from fnmatch import fnmatchcase
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.events import PENDING_KEY
from app.models import Dataset, Job, JobEvent, utcnow
from app.netguard import WebhookTargetRefused, check_url_literal, parse_networks
from app.schemas import DatasetCalibration, JobCreate
from app.settings import Settings
from workers.engine.methods.layer_common import with_compensation_budget
from workers.engine.modelzoo import check_model_id
from workers.engine.registry import get_method, parse_options

# Fields added after jobs were first stored, with their defaults: left out of the hash while at the
# default, so an Idempotency-Key used before they existed still matches the same body.
LATER_FIELDS: dict[str, object] = {"recovery": None, "target": None, "artifact_dtype": "auto"}


def request_hash(body: JobCreate) -> str:
    fields = body.model_dump(mode="json")
    for name, default in LATER_FIELDS.items():
        if fields.get(name) == default:
            fields.pop(name, None)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _readable(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{prefix}{'.' + loc if loc else ''}: {err.get('msg')}")
    return "; ".join(parts)


def validate_job(body: JobCreate, session: Session, tenant_id: str, settings: Settings) -> dict[str, Any]:
    """Check everything that can be checked without loading a model; return the normalised spec."""
    if check_model_id(body.model, settings.allowed_model_roots) == "hub":
        check_hub_allowed(body.model, settings.allowed_hub_models)
    method = get_method(body.method)
    try:
        options = parse_options(method, body.options)
    except ValidationError as exc:
        raise ApiError(422, "invalid_options", _readable(exc, "options")) from None
    options = with_compensation_budget(options, body.options, body.calibration.source)
    evaluation = None
    if body.evaluation is not None:
        from workers.engine.evaluation import EvaluationConfig

        try:
            evaluation = EvaluationConfig.model_validate(body.evaluation).model_dump(mode="json")
        except ValidationError as exc:
            raise ApiError(422, "invalid_evaluation", _readable(exc, "evaluation")) from None
        for name in evaluation.get("perplexity", []):
            if name.startswith("dataset:"):
                _tenant_dataset(session, tenant_id, name.removeprefix("dataset:"))
        needs_data = evaluation["tasks"] or any(not n.startswith("dataset:") for n in evaluation["perplexity"])
        if needs_data and settings.eval_data_dir is None:
            raise ApiError(
                422,
                "eval_data_missing",
                "Built-in perplexity texts and zero-shot tasks need SLIMFORGE_EVAL_DATA_DIR on the server; "
                "use 'dataset:<id>' texts instead, or ask the operator to configure it.",
            )
    if body.webhook_url is not None and not settings.webhook_secret:
        raise ApiError(
            422,
            "webhooks_disabled",
            "This server has no SLIMFORGE_WEBHOOK_SECRET, so it cannot sign webhooks; omit webhook_url.",
        )
    if body.webhook_url is not None:
        try:
            check_url_literal(str(body.webhook_url), parse_networks(settings.webhook_allowed_networks))
        except WebhookTargetRefused as exc:
            raise ApiError(422, "webhook_url_not_allowed", f"The {exc}.") from None
    if isinstance(body.calibration, DatasetCalibration):
        _tenant_dataset(session, tenant_id, body.calibration.dataset_id)
    if body.recovery is not None and body.recovery.dataset_id is not None:
        _tenant_dataset(session, tenant_id, body.recovery.dataset_id)
    if body.target is not None and not body.target.perplexity_set.startswith("dataset:"):
        if settings.eval_data_dir is None and body.target.max_perplexity_ratio is not None:
            raise ApiError(
                422, "eval_data_missing", "target.perplexity_set needs SLIMFORGE_EVAL_DATA_DIR; use 'dataset:<id>'."
            )
    if body.target is not None and body.target.tasks and settings.eval_data_dir is None:
        raise ApiError(422, "eval_data_missing", "target.tasks need SLIMFORGE_EVAL_DATA_DIR on the server.")
    _refuse_overlap(body, evaluation, session, tenant_id, settings)
    spec = body.model_dump(mode="json")
    spec["options"] = options.model_dump(mode="json")
    spec["evaluation"] = evaluation
    return spec


def check_hub_allowed(model_id: str, allowed: list[str]) -> None:
    """Hub ids download code-adjacent files and weights on a worker: only operator-approved ones."""
    if any(fnmatchcase(model_id, pattern) for pattern in allowed):
        return
    hint = f"allowed here: {', '.join(allowed)}" if allowed else "none are allowed on this server"
    raise ApiError(
        403,
        "hub_model_not_allowed",
        f"Hugging Face model {model_id!r} is not in SLIMFORGE_ALLOWED_HUB_MODELS ({hint}); "
        "use a builtin: model or a local directory, or ask the operator to allow it.",
    )


def _refuse_overlap(
    body: JobCreate, evaluation: dict[str, Any] | None, session: Session, tenant_id: str, settings: Settings
) -> None:
    """422 when any evaluated text shares lines (by fingerprint) with calibration or recovery text."""
    from workers.engine.calibration import read_calibration_file
    from workers.engine.evaluation import builtin_text
    from workers.engine.recovery.overlap import shared_lines

    training: dict[str, Dataset] = {}
    if isinstance(body.calibration, DatasetCalibration):
        training["calibration"] = _tenant_dataset(session, tenant_id, body.calibration.dataset_id)
    if body.recovery is not None and body.recovery.dataset_id is not None:
        training["recovery"] = _tenant_dataset(session, tenant_id, body.recovery.dataset_id)
    scored = list((evaluation or {}).get("perplexity", []))
    if body.target is not None and body.target.max_perplexity_ratio is not None:
        scored.append(body.target.perplexity_set)
    if not training or not scored:
        return
    train_texts = {use: read_calibration_file(settings.data_dir / d.path) for use, d in training.items()}
    for name in dict.fromkeys(scored):
        if name.startswith("dataset:"):
            dataset = _tenant_dataset(session, tenant_id, name.removeprefix("dataset:"))
            same_file = [use for use, d in training.items() if d.sha256 == dataset.sha256]
            texts = read_calibration_file(settings.data_dir / dataset.path)
        else:
            assert settings.eval_data_dir is not None  # checked above
            same_file, texts = [], [builtin_text(name, settings.eval_data_dir)]
        for use, train in train_texts.items():
            shared = shared_lines(train, texts)
            if shared or use in same_file:
                raise ApiError(
                    422,
                    "evaluation_overlap",
                    f"Evaluation text {name!r} overlaps the {use} data ({shared} shared lines"
                    f"{', identical file' if use in same_file else ''}): a model must never be scored on text it "
                    "was calibrated or trained on. Evaluate on held-out text.",
                )


def _tenant_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise ApiError(
            404, "dataset_not_found", f"Dataset {dataset_id!r} does not exist (upload it with POST /v1/datasets)."
        )
    return dataset


def add_event(
    session: Session, job_id: str, kind: str, message: str, stage: str | None = None, data: dict | None = None
) -> None:
    """Append an event with the job's next sequence number (atomic increment on the job row).

    The event is also queued on the session for publication once the transaction commits (app.events).
    """
    seq = session.execute(
        update(Job).where(Job.id == job_id).values(event_count=Job.event_count + 1).returning(Job.event_count)
    ).scalar_one()
    created = utcnow()
    session.add(
        JobEvent(job_id=job_id, seq=seq, kind=kind, stage=stage, message=message, data=data, created_at=created)
    )
    payload = {"job_id": job_id, "seq": seq, "created_at": created.isoformat(), "kind": kind, "stage": stage}
    session.info.setdefault(PENDING_KEY, []).append({**payload, "message": message, "data": data})


def create_job(
    session: Session,
    tenant_id: str,
    body: JobCreate,
    spec: dict[str, Any],
    settings: Settings,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """Insert the job (or find the idempotent twin); returns (job, created).

    Two concurrent requests with one key both miss the first look-up; the unique constraint
    lets one insert win, and the loser rolls back and answers with the winner's job.
    """
    digest = request_hash(body)
    if idempotency_key:
        existing = idempotent_twin(session, tenant_id, idempotency_key, digest)
        if existing is not None:
            return existing, False
    job = Job(
        tenant_id=tenant_id,
        status="queued",
        model=body.model,
        method=body.method,
        # The column is NOT NULL; quality-targeted jobs keep their (absent) sparsity in the spec.
        target_sparsity=body.target_sparsity if body.target_sparsity is not None else 0.0,
        sparsity_basis=body.sparsity_basis,
        spec=spec,
        idempotency_key=idempotency_key,
        request_hash=digest,
        max_attempts=settings.max_attempts,
        created_at=utcnow(),
    )
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        existing = idempotent_twin(session, tenant_id, idempotency_key, digest) if idempotency_key else None
        if existing is None:
            raise
        return existing, False
    add_event(session, job.id, "status", "job queued", data={"status": "queued"})
    return job, True


def idempotent_twin(session: Session, tenant_id: str, key: str, digest: str) -> Job | None:
    """The job already created with this key (409 if it was for a different body), or None."""
    existing = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    if existing is not None and existing.request_hash != digest:
        raise ApiError(
            409,
            "idempotency_conflict",
            "This Idempotency-Key was already used with a different request body; use a new key.",
        )
    return existing


def tenant_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    # Another tenant's job is reported exactly like a missing one: ids leak nothing.
    if job is None or job.tenant_id != tenant_id:
        raise ApiError(404, "job_not_found", f"Job {job_id!r} does not exist.")
    return job
