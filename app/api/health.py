"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import hmac
import logging

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from app.api.deps import ServicesDep
from app.auth import tenant_for_request
from app.errors import problem
from app.openapi import responses, text_response

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses=responses(503))
def readyz(services: ServicesDep) -> dict[str, str] | Response:
    # The reason goes to the log, not to the (unauthenticated) caller: driver errors name hosts and users.
    checks = {}
    try:
        with services.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception:  # readiness reports, it never raises
        log.exception("readiness: database unreachable")
        return problem(503, "not_ready", "The database is unreachable; see the server log.")
    try:
        with services.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception:
        log.exception("readiness: broker unreachable")
        return problem(503, "not_ready", "The job queue (broker) is unreachable; see the server log.")
    return {"status": "ready", **checks}


def _scrape_scope(request: Request, services: ServicesDep) -> str | None:
    """None (every tenant) for the operator's SLIMFORGE_METRICS_TOKEN, else the API key's tenant."""
    token = services.settings.metrics_token
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if token and scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
        return None
    return tenant_for_request(request, services.sessions)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: text_response("Prometheus text format", "text/plain"), **responses(401, 429)},
)
def metrics(request: Request, services: ServicesDep) -> Response:
    """All tenants and process metrics with the metrics token, else only the caller's tenant's jobs."""
    from app.metrics import exposition

    tenant = _scrape_scope(request, services)
    # Job metrics come from the database (the source of truth) at every scrape; see app/metrics.py.
    with services.sessions() as session:
        body = exposition(session, tenant)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
