"""Per-tenant quotas: active jobs (429 `job_quota_exceeded`) and stored bytes (507 `storage_quota_exceeded`).

The checks read the database at submit/upload time; two requests racing past the same limit can
both pass, so a quota may be overshot by the number of concurrent requests (it is a guard
against runaway clients, not billing).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import Artifact, Dataset, Job
from app.settings import Settings

ACTIVE_STATUSES = ("queued", "running", "cancelling")


def check_job_quota(session: Session, tenant_id: str, settings: Settings) -> None:
    limit = settings.max_active_jobs_per_tenant
    if limit <= 0:
        return
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES))
    )
    if (active or 0) >= limit:
        raise ApiError(
            429,
            "job_quota_exceeded",
            f"This tenant already has {active} queued or running jobs (limit {limit}); "
            "wait for some to finish or cancel them, then submit again.",
        )


def stored_bytes(session: Session, tenant_id: str) -> int:
    datasets = session.scalar(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant_id)
    )
    artifacts = session.scalar(
        select(func.coalesce(func.sum(Artifact.total_bytes), 0)).where(Artifact.tenant_id == tenant_id)
    )
    return int(datasets or 0) + int(artifacts or 0)


def check_storage_quota(session: Session, tenant_id: str, settings: Settings, incoming: int = 0) -> None:
    """Refuse when the tenant's datasets + artifacts (+ `incoming` bytes) would pass the quota."""
    limit = settings.max_stored_bytes_per_tenant
    if limit <= 0:
        return
    used = stored_bytes(session, tenant_id)
    if used + incoming > limit or (incoming == 0 and used >= limit):
        raise ApiError(
            507,
            "storage_quota_exceeded",
            f"This tenant stores {used} bytes of datasets and artifacts (quota {limit}); "
            "delete old artifacts or datasets, or ask the operator to raise SLIMFORGE_MAX_STORED_BYTES_PER_TENANT.",
        )
