"""/v1/jobs: submit, inspect, list, cancel and retry pruning jobs; their events (JSON and SSE)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import Row, and_, or_, select, update

from app.api.deps import ServicesDep, SessionDep, TenantDep
from app.auth import bearer_digest
from app.dryrun import dry_run as run_dry_run
from app.errors import ApiError, is_disk_full, no_space_left
from app.event_pages import EVENT_PAGES, EventPage, read_events, sse_frame
from app.events import TooManyStreams, is_terminal_event
from app.inputs import EventCursor, parse_last_event_id, require_plain_text
from app.job_views import JOB_VIEWS, VERSION_COLUMNS
from app.jobs_service import add_event, create_job, idempotent_twin, request_hash, tenant_job, validate_job
from app.models import JOB_STATUSES, TERMINAL_STATUSES, Job, utcnow
from app.openapi import V1_RESPONSES, responses, text_response
from app.quotas import check_job_quota, check_storage_quota
from app.schemas import DryRunOut, EventOut, JobCreate, JobOut, JobPage
from app.webhooks import notify_terminal

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=V1_RESPONSES)
FRAME_KEY = "_sse_frame"  # set on a hub payload once its SSE frame is rendered
NOTHING = EventPage((), terminal=False)


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses={
        200: {
            "description": "An idempotent replay (the existing job), or the plan of a dry run",
            "model": JobOut | DryRunOut,
        },
        **responses(403, 404, 409, 413, 503, 507),
    },
)
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
    require_plain_text(idempotency_key, "The Idempotency-Key header")
    spec = validate_job(body, session, tenant, services.settings)
    if dry_run:
        return JSONResponse(run_dry_run(body, spec, services.settings))
    if not (idempotency_key and idempotent_twin(session, tenant, idempotency_key, request_hash(body))):
        # Quotas limit new jobs; a replay of an existing one still answers 200.
        check_job_quota(session, tenant, services.settings)
        check_storage_quota(session, tenant, services.settings)
    job, created = create_job(session, tenant, body, spec, services.settings, idempotency_key)
    session.commit()
    if created:
        try:
            services.enqueue(job.id)
        except Exception as exc:  # broker down or its disk full: say so; the row must not claim to be queued
            settings = services.settings
            full = is_disk_full(exc) or (settings.embedded_broker and no_space_left(settings.broker_dir))
            _fail_unqueued(session, job, exc, "insufficient_storage" if full else "broker_unavailable")
            if full:
                raise ApiError(507, "insufficient_storage", "The job queue's disk is full; try again later.") from exc
            raise ApiError(503, "broker_unavailable", "The job queue is unreachable; try again later.") from exc
    else:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.from_row(job)


def _fail_unqueued(session: SessionDep, job: Job, exc: Exception, code: str) -> None:
    try:
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(status="failed", error_code=code, error_message=str(exc)[:500], finished_at=utcnow())
        )
        session.commit()
    except Exception:  # the store may be on the same full disk; the job then stays queued for a re-publish
        session.rollback()
        log.exception("could not mark unqueued job %s failed", job.id)


@router.get(
    "/{job_id}",
    response_model=JobOut,
    responses={304: {"description": "Not modified (If-None-Match matched the ETag)"}, **responses(404)},
)
async def get_job(job_id: str, request: Request, services: ServicesDep, tenant: TenantDep) -> Response:
    """The job; `ETag` + `If-None-Match` make an unchanged poll a bodiless 304.

    Served from app.job_views: at most `job_read_max_age_seconds` behind the store, status changes at once.
    """
    view = await JOB_VIEWS.get(services.sessions, job_id, services.settings.job_read_max_age_seconds)
    if view is None or view.tenant_id != tenant:  # another tenant's job is reported like a missing one
        raise ApiError(404, "job_not_found", f"Job {job_id!r} does not exist.")
    headers = {"ETag": view.etag, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") == view.etag:
        return Response(status_code=304, headers=headers)
    return Response(view.body, media_type="application/json", headers=headers)


def _encode_cursor(job: Job | Row[Any]) -> str:
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
) -> Response:
    query = select(*VERSION_COLUMNS, Job.created_at).where(Job.tenant_id == tenant)
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
    rows = session.execute(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    items = rows[:limit]
    next_cursor = _encode_cursor(items[-1]) if len(rows) > limit else None
    # The JobPage document, assembled from the cached item bodies (only changed jobs are rendered).
    body = b'{"items":[' + b",".join(JOB_VIEWS.bodies(session, items)) + b'],"next_cursor":'
    return Response(body + json.dumps(next_cursor).encode() + b"}", media_type="application/json")


@router.post("/{job_id}/cancel", response_model=JobOut, responses=responses(404))
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
            notify_terminal(
                services.sessions,
                job.id,
                services.settings.webhook_secret,
                allowed_networks=services.settings.webhook_allowed_networks,
            )
    elif job.status == "running":
        changed = session.execute(
            update(Job).where(Job.id == job.id, Job.status == "running").values(status="cancelling")
        ).rowcount
        if changed:
            add_event(session, job.id, "status", "cancellation requested", data={"status": "cancelling"})
    session.commit()
    session.refresh(job)
    return JobOut.from_row(job)


@router.post("/{job_id}/retry", response_model=JobOut, status_code=202, responses=responses(404, 409, 503))
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


@router.get("/{job_id}/events", response_model=list[EventOut], responses=responses(404))
def list_events(job_id: str, session: SessionDep, tenant: TenantDep, after: EventCursor = 0) -> list[EventOut]:
    tenant_job(session, tenant, job_id)
    return read_events(session, job_id, after)


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={
        200: text_response("Server-Sent Events: `id:` is the event seq, `data:` an event JSON", "text/event-stream"),
        **responses(404, 429),
    },
)
async def stream_events(
    job_id: str, request: Request, services: ServicesDep, tenant: TenantDep, after: EventCursor = 0
) -> StreamingResponse:
    """Server-Sent Events: each event once, in order; the stream ends when the job is terminal.

    No database connection is held while the stream waits: live events arrive from the process's
    hub (app.events), and the database is read only to resume (`Last-Event-ID` / `after`), to fill
    a gap, and at each keep-alive.
    """
    last = parse_last_event_id(request.headers.get("last-event-id"), after)
    max_age = services.settings.job_read_max_age_seconds
    view = await JOB_VIEWS.get(services.sessions, job_id, max_age)
    if view is None or view.tenant_id != tenant:  # another tenant's job is reported like a missing one
        raise ApiError(404, "job_not_found", f"Job {job_id!r} does not exist.")
    try:
        subscription = services.subscribe(job_id, owner=bearer_digest(request))
    except TooManyStreams:
        raise ApiError(
            429,
            "too_many_streams",
            f"This key already holds {services.settings.max_streams_per_key} event streams on this server; "
            "close some, or poll GET /v1/jobs/{id} with If-None-Match instead.",
            headers={"Retry-After": "5"},
        ) from None
    heartbeat = services.settings.sse_heartbeat_seconds

    async def catch_up() -> EventPage:
        """Shared with every stream of this job that asks the same now (app.event_pages)."""
        return await EVENT_PAGES.after(services.sessions, job_id, last, max_age)

    async def missed_something() -> bool:
        """Whether the store holds an event this stream has not sent, or the job has ended.

        Answered from the job's cached view (app.job_views), which all streams and polls of the
        job in this process share, so a keep-alive costs at most one small read per job.
        """
        view = await JOB_VIEWS.get(services.sessions, job_id, max_age)
        return view is None or view.event_count > last or view.status in TERMINAL_STATUSES

    def live_frame(payload: dict[str, Any]) -> str:
        """A published event's frame, rendered once for every stream of this process that receives it."""
        rendered = payload.get(FRAME_KEY)
        if rendered is None:
            rendered = payload[FRAME_KEY] = sse_frame(EventOut.model_validate(payload))
        return rendered

    async def generate() -> AsyncIterator[str]:
        nonlocal last
        try:
            # Subscribed before this first read, so nothing committed in between is missed.
            page = await catch_up()
            while True:
                unsent = [(seq, rendered) for seq, rendered in page.frames if seq > last]
                if unsent:  # one write for the whole page: a resume of hundreds of events is one chunk
                    last = unsent[-1][0]
                    yield "".join(rendered for _, rendered in unsent)
                if page.terminal:
                    return
                try:
                    # Jittered, so streams opened together do not all wake in the same instant.
                    wait = heartbeat * random.uniform(0.8, 1.0)
                    payload = await asyncio.wait_for(subscription.queue.get(), timeout=wait)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    page = await catch_up() if await missed_something() else NOTHING
                    continue
                if payload["seq"] <= last:
                    page = NOTHING
                elif payload["seq"] == last + 1:
                    last = payload["seq"]
                    yield live_frame(payload)
                    page = EventPage((), terminal=is_terminal_event(payload))
                else:  # a gap (a message lost or dropped): read the missing events from the database
                    page = await catch_up()
        finally:
            subscription.close()

    return StreamingResponse(
        generate(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
