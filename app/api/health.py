"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from app.api.deps import ServicesDep
from app.errors import problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
def readyz(services: ServicesDep) -> dict[str, str] | Response:
    checks = {}
    try:
        with services.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # readiness reports, it never raises
        return problem(503, "not_ready", f"database unreachable: {exc}")
    try:
        with services.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        return problem(503, "not_ready", f"broker unreachable: {exc}")
    return {"status": "ready", **checks}


@router.get("/metrics")
def metrics(services: ServicesDep) -> Response:
    # Job metrics come from the database (the source of truth) at every scrape; see app/metrics.py.
    from app.metrics import exposition

    with services.sessions() as session:
        body = exposition(session)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
