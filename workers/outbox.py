"""The outbox sweeper: no job stays `queued` in the database while the broker has forgotten it.

The database commits a job before its message is sent, and a broker can lose messages afterwards
(a Redis restart without persistence, a flush, a failover, a send that failed while the broker was
down). Every reaper pass therefore looks at jobs that have been `queued` for longer than
`requeue_grace_seconds`, asks the broker which task ids it holds (waiting or delivered-unacked),
and re-sends the missing ones. A duplicate message is harmless: only one delivery can claim the
job (workers/runner.claim).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.jobs_service import add_event
from app.models import Job, utcnow
from app.settings import Settings

log = logging.getLogger(__name__)
# kombu's Redis transport keeps priority sub-queues as "<queue>\x06\x16<priority>".
REDIS_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def _task_id(message: object) -> str | None:
    if isinstance(message, dict):
        headers = message.get("headers") or {}
        return headers.get("id") or (message.get("properties") or {}).get("correlation_id")
    return None


def redis_task_ids(url: str, queue: str) -> set[str]:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    ids: set[str] = set()
    for key in (queue + suffix for suffix in REDIS_PRIORITY_SUFFIXES):
        for raw in client.lrange(key, 0, -1):
            ids.add(_task_id(json.loads(raw)) or "")
    for raw in client.hvals("unacked"):  # delivered to a worker, not yet acknowledged
        ids.add(_task_id(json.loads(raw)[0]) or "")
    return ids - {""}


def filesystem_task_ids(queue_dir: Path, queue: str) -> set[str]:
    ids: set[str] = set()
    for path in queue_dir.glob(f"*.{queue}.msg"):
        try:
            ids.add(_task_id(json.loads(path.read_bytes())) or "")
        except (OSError, ValueError):  # consumed meanwhile, or half-written: the next pass sees it
            continue
    return ids - {""}


def quarantine_broken_messages(queue_dir: Path) -> list[Path]:
    """Move message files that are not JSON (a process killed mid-write) out of the embedded queue.

    The filesystem transport stops at the first unreadable file, so one broken file would block every
    job behind it; the sweeper re-sends whatever job it carried.
    """
    broken_dir = queue_dir.parent / "broken"
    moved = []
    for path in sorted(queue_dir.glob("*.msg")):
        try:
            json.loads(path.read_bytes())
        except ValueError:
            broken_dir.mkdir(exist_ok=True)
            moved.append(path.rename(broken_dir / path.name))
        except OSError:
            continue
    if moved:
        log.warning("moved %d unreadable message file(s) to %s", len(moved), broken_dir)
    return moved


def broker_task_ids(settings: Settings) -> set[str] | None:
    """Task ids the broker holds for our queue; None when this broker cannot be inspected."""
    url = settings.resolved_broker_url
    if settings.embedded_broker:
        return filesystem_task_ids(settings.broker_dir / "queue", settings.queue_name)
    if url.startswith(("redis://", "rediss://")):
        return redis_task_ids(url, settings.queue_name)
    return None


def resend_lost_jobs(
    sessions: sessionmaker[Session],
    settings: Settings,
    enqueue: Callable[[str], None],
    known_ids: Callable[[Settings], set[str] | None] = broker_task_ids,
) -> list[str]:
    """Re-send every queued job past the grace period that the broker does not hold; returns their ids."""
    cutoff = utcnow() - timedelta(seconds=settings.requeue_grace_seconds)
    with sessions() as session:
        stale = session.scalars(
            select(Job.id).where(Job.status == "queued", Job.updated_at < cutoff).order_by(Job.created_at)
        ).all()
    if not stale:
        return []
    held = known_ids(settings)  # with an opaque broker every stale job is re-sent once per grace period
    missing = [job_id for job_id in stale if held is None or job_id not in held]
    resent = []
    for job_id in missing:
        try:
            enqueue(job_id)
        except Exception as exc:  # broker still down: the next pass tries again
            log.warning("could not re-send job %s (%s); will retry", job_id, exc)
            break
        with session_scope(sessions) as session:  # restart its grace period
            touched = update(Job).where(Job.id == job_id, Job.status == "queued").values(updated_at=utcnow())
            if session.execute(touched).rowcount:
                add_event(session, job_id, "log", "re-sent to the queue: the broker no longer held its message")
        resent.append(job_id)
    if resent:
        log.warning("re-sent %d queued job(s) the broker had lost: %s", len(resent), resent)
    return resent
