"""Prometheus metrics: HTTP latency per route (this process), job and worker metrics (the database).

Jobs run in worker processes, so their metrics come from the job rows, the source of truth, at
every scrape: that way every API replica reports the same numbers. HTTP latency is per process and
observed by a small ASGI middleware, labelled with the route template (never the raw path, whose
ids would explode the label set).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from sqlalchemy import case, func, null, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.models import JOB_STATUSES, Job, utcnow

# Jobs take seconds (tiny models) to hours (large ones on a busy queue).
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, float("inf"))
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf"))

HTTP_REGISTRY = CollectorRegistry()
HTTP_LATENCY = Histogram(
    "slimforge_http_request_duration_seconds",
    "HTTP request latency by route template, method and status",
    ["route", "method", "status"],
    buckets=HTTP_BUCKETS,
    registry=HTTP_REGISTRY,
)


class HttpLatency:
    """ASGI middleware timing every HTTP request until its response has started."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def record_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            HTTP_LATENCY.labels(route=template, method=scope["method"], status=str(status["code"])).observe(
                time.perf_counter() - started
            )


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max((end - start).total_seconds(), 0.0)


def _timestamp(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def job_registry(session: Session, tenant: str | None = None) -> CollectorRegistry:
    """A fresh registry with the job, failure and (for the operator) worker metrics from the database.

    With a tenant, only that tenant's jobs count and no worker metrics are shown.
    """
    registry = CollectorRegistry()
    scope = (Job.tenant_id == tenant,) if tenant is not None else ()
    counts = Gauge("slimforge_jobs", "Jobs by status", ["status"], registry=registry)
    by_status = select(Job.status, func.count()).where(*scope).group_by(Job.status)
    for status, count in dict(session.execute(by_status).all()).items():
        counts.labels(status=status).set(count)
    for status in JOB_STATUSES:
        counts.labels(status=status)  # every status is present, zero when no job has it
    duration = Histogram(
        "slimforge_job_duration_seconds",
        "Run time of finished jobs (start to end) by method and final status",
        ["method", "status"],
        buckets=JOB_BUCKETS,
        registry=registry,
    )
    queue_wait = Histogram(
        "slimforge_job_queue_wait_seconds",
        "Time from submission to the worker starting the job, by method",
        ["method"],
        buckets=JOB_BUCKETS,
        registry=registry,
    )
    stages = Histogram(
        "slimforge_job_stage_seconds",
        "Time per stage of succeeded jobs (result.timings), by method and stage",
        ["method", "stage"],
        buckets=JOB_BUCKETS,
        registry=registry,
    )
    failures = Gauge(
        "slimforge_job_failures", "Failed jobs by error code and stage", ["code", "stage"], registry=registry
    )
    # Only the timings are read out of each result (a JSON path in SQL): reports with curves and
    # per-layer tables are many KiB per job, and a scrape must not load them all.
    timings_of = case((Job.status == "succeeded", Job.result["timings"]), else_=null())
    rows = session.execute(
        select(Job.method, Job.status, Job.created_at, Job.started_at, Job.finished_at, timings_of).where(*scope)
    ).all()
    for method, status, created, started, finished, timings in rows:
        if (wait := _seconds(created, started)) is not None:
            queue_wait.labels(method=method).observe(wait)
        if status in ("succeeded", "failed", "cancelled") and (run := _seconds(started, finished)) is not None:
            duration.labels(method=method, status=status).observe(run)
        for stage, seconds in (timings if isinstance(timings, dict) else {}).items():
            if isinstance(seconds, int | float):
                stages.labels(method=method, stage=stage).observe(float(seconds))
    failed = select(Job.error_code, Job.error_stage, func.count()).where(Job.status == "failed", *scope)
    for code, stage, count in session.execute(failed.group_by(Job.error_code, Job.error_stage)).all():
        failures.labels(code=code or "unknown", stage=stage or "none").set(count)
    if tenant is None:
        _worker_metrics(session, registry)
    return registry


def _worker_metrics(session: Session, registry: CollectorRegistry) -> None:
    last_beat = Gauge(
        "slimforge_worker_last_heartbeat_timestamp_seconds",
        "Unix time of each worker's latest job heartbeat",
        ["worker"],
        registry=registry,
    )
    running = Gauge("slimforge_worker_running_jobs", "Jobs each worker is running now", ["worker"], registry=registry)
    # Workers seen within a day: worker names carry a pid, so older ones are long gone.
    recent = utcnow() - timedelta(days=1)
    beats = (
        select(Job.worker, func.max(Job.heartbeat_at))
        .where(Job.worker.is_not(None), Job.heartbeat_at >= recent)
        .group_by(Job.worker)
    )
    for worker, beat in session.execute(beats).all():
        if beat is not None:
            last_beat.labels(worker=worker).set(_timestamp(beat))
        running.labels(worker=worker).set(0)
    active = select(Job.worker, func.count()).where(Job.status.in_(("running", "cancelling")), Job.worker.is_not(None))
    for worker, count in session.execute(active.group_by(Job.worker)).all():
        running.labels(worker=worker).set(count)


def exposition(session: Session, tenant: str | None = None) -> bytes:
    """The /metrics body: database-derived metrics, then (for the operator) this process's HTTP latency."""
    body = generate_latest(job_registry(session, tenant))
    return body if tenant is not None else body + generate_latest(HTTP_REGISTRY)
