"""The reaper: jobs whose worker died (no heartbeat) are re-queued, or failed once out of attempts.
Each pass also runs the outbox sweeper (workers/outbox.py) for queued jobs the broker lost.

Every change is a conditional UPDATE on the stale heartbeat, so any number of reapers (one per API
and worker process) can run at once. A lost job is noticed within
heartbeat_timeout_seconds + reaper_interval_seconds (default 120 s + 15 s).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.jobs_service import add_event
from app.models import Job, utcnow
from app.settings import Settings
from app.webhooks import notify_terminal
from workers.outbox import resend_lost_jobs

log = logging.getLogger(__name__)


def reap_once(sessions: sessionmaker[Session], settings: Settings, enqueue: Callable[[str], None]) -> list[str]:
    """Handle every job with a stale heartbeat; returns the ids re-queued."""
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_seconds)
    requeued: list[str] = []
    ended: list[str] = []
    with session_scope(sessions) as session:
        stale = session.scalars(
            select(Job).where(Job.status.in_(("running", "cancelling")), Job.heartbeat_at < cutoff)
        ).all()
        for job in stale:
            guard = (
                Job.id == job.id,
                Job.attempts == job.attempts,
                Job.status == job.status,
                Job.heartbeat_at < cutoff,
            )
            silent = f"no heartbeat for over {settings.heartbeat_timeout_seconds:.0f} s (worker {job.worker} lost)"
            if job.status == "cancelling":
                values = {"status": "cancelled", "finished_at": utcnow()}
                message = f"job cancelled: {silent}"
            elif job.attempts < job.max_attempts:
                values = {"status": "queued", "stage": None, "progress": 0.0, "worker": None}
                message = f"job re-queued: {silent}"
            else:
                values = {
                    "status": "failed",
                    "finished_at": utcnow(),
                    "error_code": "worker_lost",
                    "error_stage": job.stage,
                    "error_message": f"The worker stopped responding ({silent}) and the job used all "
                    f"{job.max_attempts} attempts.",
                }
                message = f"job failed: {silent}"
            if session.execute(update(Job).where(*guard).values(**values)).rowcount:
                add_event(session, job.id, "status", message, stage=job.stage, data={"status": values["status"]})
                if values["status"] == "queued":
                    requeued.append(job.id)
                else:
                    ended.append(job.id)
    for job_id in ended:
        notify_terminal(sessions, job_id, settings.webhook_secret, allowed_networks=settings.webhook_allowed_networks)
    for job_id in requeued:  # enqueue only after the commit above
        try:
            enqueue(job_id)
        except Exception:
            log.exception("reaper could not enqueue %s; it stays queued for the next pass", job_id)
    return requeued


class Reaper:
    """Runs reap_once every interval in a daemon thread."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, enqueue: Callable[[str], None]) -> None:
        self.sessions, self.settings, self.enqueue = sessions, settings, enqueue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slimforge-reaper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_seconds):
            try:
                reap_once(self.sessions, self.settings, self.enqueue)
                resend_lost_jobs(self.sessions, self.settings, self.enqueue)
            except Exception as exc:  # e.g. the database restarting: the next pass tries again
                log.warning("reaper pass failed: %s", exc)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
