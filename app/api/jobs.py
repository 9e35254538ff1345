"""/v1/jobs: submit, inspect, list, cancel and retry pruning jobs; their events (JSON and SSE)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import and_, or_, select, update

from app.api.deps import ServicesDep, SessionDep, TenantDep
from app.errors import ApiError
from app.jobs_service import add_event, create_job, tenant_job, validate_job
from app.models import JOB_STATUSES, TERMINAL_STATUSES, Job, JobEvent, utcnow
from app.schemas import EventOut, JobCreate, JobOut, JobPage
from app.webhooks import notify_terminal
from workers.engine.modelzoo import BUILTIN_PREFIX, resolve_checkpoint
from workers.engine.pipeline import plan

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobOut)
def submit_job(
    body: JobCreate,
    request: Request,
    response: Response,
    services: ServicesDep,
    session: SessionDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    dry_run: bool = False,
) -> Any:
    spec = validate_job(body, session, tenant, services.settings)
    if dry_run:
        return JSONResponse(_dry_run(body, spec, services))
    job, created = create_job(session, tenant, body, spec, services.settings, idempotency_key)
    session.commit()
    if created:
        try:
            services.enqueue(job.id)
        except Exception as exc:  # broker down: say so; the job row must not claim to be queued
            _fail_unqueued(session, job, exc)
            raise ApiError(503, "broker_unavailable", "The job queue is unreachable; try again later.") from exc
    else:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.from_row(job)


def _fail_unqueued(session: SessionDep, job: Job, exc: Exception) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(status="failed", error_code="broker_unavailable", error_message=str(exc)[:500], finished_at=utcnow())
    )
    session.commit()


def _dry_run(body: JobCreate, spec: dict[str, Any], services: ServicesDep) -> dict[str, Any]:
    from transformers import AutoConfig

    settings = services.settings
    if body.model.startswith(BUILTIN_PREFIX) or body.model.startswith(("/", ".", "~")):
        source = resolve_checkpoint(body.model, settings.allowed_model_roots, settings.models_dir)
    else:
        source = body.model
    config = AutoConfig.from_pretrained(source)
    resolved = plan(
        config,
        method=body.method,
        # A quality-targeted job is planned at its most-pruned candidate.
        target_sparsity=body.target_sparsity if body.target is None else body.target.max_sparsity,
        sparsity_basis=body.sparsity_basis,
        options=spec["options"],
    )
    if body.target is not None:
        resolved["quality_target"] = {**spec["target"], "plan_is_for": "the most-pruned candidate (max_sparsity)"}
    if body.recovery is not None:
        from workers.engine.recovery import estimate

        params = resolved["parameters_after"]["total"]
        resolved["recovery"] = {**spec["recovery"], **estimate(body.recovery, params, settings.device)}
    return {"dry_run": True, "model": body.model, "method": body.method, "plan": resolved, "spec": spec}


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    return JobOut.from_row(tenant_job(session, tenant, job_id))


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id])
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError) as exc:
        raise ApiError(400, "invalid_cursor", "The cursor is not one this API returned; start without it.") from exc


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: Annotated[list[str] | None, Query()] = None,
    method: str | None = None,
    model: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> JobPage:
    query = select(Job).where(Job.tenant_id == tenant)
    if status:
        unknown = sorted(set(status) - set(JOB_STATUSES))
        if unknown:
            raise ApiError(422, "invalid_status", f"Unknown status {unknown}; use one of {list(JOB_STATUSES)}.")
        query = query.where(Job.status.in_(status))
    if method:
        query = query.where(Job.method == method)
    if model:
        query = query.where(Job.model == model)
    if cursor:
        created, last_id = _decode_cursor(cursor)
        # Newest first; (created_at, id) is a total order, so pages never skip or repeat a job.
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id)))
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    items = rows[:limit]
    next_cursor = _encode_cursor(items[-1]) if len(rows) > limit else None
    return JobPage(items=[JobOut.from_row(j) for j in items], next_cursor=next_cursor)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> JobOut:
    """Cooperative and idempotent: a queued job never starts, a running one stops at its next step."""
    job = tenant_job(session, tenant, job_id)
    now = utcnow()
    if job.status == "queued":
        changed = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "queued")
            .values(status="cancelled", finished_at=now, stage=None)
        ).rowcount
        if changed:
            add_event(session, job.id, "status", "job cancelled before it started", data={"status": "cancelled"})
            session.commit()
            notify_terminal(services.sessions, job.id, services.settings.webhook_secret)
    elif job.status == "running":
        changed = session.execute(
            update(Job).where(Job.id == job.id, Job.status == "running").values(status="cancelling")
        ).rowcount
        if changed:
            add_event(session, job.id, "status", "cancellation requested", data={"status": "cancelling"})
    session.commit()
    session.refresh(job)
    return JobOut.from_row(job)


@router.post("/{job_id}/retry", response_model=JobOut, status_code=202)
def retry_job(job_id: str, response: Response, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> JobOut:
    """Run a failed or cancelled job again with the same spec (a fresh attempt budget)."""
    job = tenant_job(session, tenant, job_id)
    if job.status not in ("failed", "cancelled"):
        raise ApiError(409, "not_retryable", f"Job is {job.status}; only failed or cancelled jobs can be retried.")
    changed = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(("failed", "cancelled")))
        .values(
            status="queued",
            attempts=0,
            stage=None,
            progress=0.0,
            error_code=None,
            error_message=None,
            error_stage=None,
            started_at=None,
            finished_at=None,
            heartbeat_at=None,
            worker=None,
        )
    ).rowcount
    if changed:
        add_event(session, job.id, "status", "job re-queued by retry", data={"status": "queued"})
    session.commit()
    if changed:
        services.enqueue(job.id)
    session.refresh(job)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.from_row(job)


def _events_after(session: SessionDep, job_id: str, after: int, limit: int = 500) -> list[EventOut]:
    rows = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after).order_by(JobEvent.seq).limit(limit)
    ).all()
    return [EventOut.model_validate(row, from_attributes=True) for row in rows]


@router.get("/{job_id}/events", response_model=list[EventOut])
def list_events(
    job_id: str, session: SessionDep, tenant: TenantDep, after: Annotated[int, Query(ge=0)] = 0
) -> list[EventOut]:
    tenant_job(session, tenant, job_id)
    return _events_after(session, job_id, after)


@router.get("/{job_id}/events/stream")
async def stream_events(
    job_id: str, request: Request, services: ServicesDep, tenant: TenantDep, after: Annotated[int, Query(ge=0)] = 0
) -> StreamingResponse:
    """Server-Sent Events: each event once, in order; the stream ends when the job is terminal."""
    with services.sessions() as session:
        tenant_job(session, tenant, job_id)
    last = int(request.headers.get("last-event-id", after) or after)

    async def generate() -> AsyncIterator[str]:
        nonlocal last
        while not await request.is_disconnected():
            with services.sessions() as session:
                events = _events_after(session, job_id, last)
                status = session.scalar(select(Job.status).where(Job.id == job_id))
            for event in events:
                last = event.seq
                yield f"id: {event.seq}\nevent: {event.kind}\ndata: {event.model_dump_json()}\n\n"
            if not events and status in TERMINAL_STATUSES:
                return
            if not events:
                yield ": keep-alive\n\n"
                await asyncio.sleep(1.0)

    return StreamingResponse(generate(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
