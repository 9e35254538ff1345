"""A running job's view of its database row: claim, progress, heartbeat, cancel checks, finish.

Every write is conditioned on (status running/cancelling, this attempt), so a worker that lost its
job (the reaper re-queued it after a missed heartbeat) can never overwrite the new attempt.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.db import retry_on_disconnect, session_scope
from app.jobs_service import add_event
from app.models import Job, utcnow
from workers import shutdown

# Share of the overall progress each stage covers (evaluation runs before and after pruning).
STAGE_SPANS: dict[str, tuple[float, float]] = {
    "loading_model": (0.0, 5.0),
    "calibrating": (5.0, 10.0),
    "scoring": (10.0, 55.0),
    "pruning": (55.0, 60.0),
    "compensating": (60.0, 70.0),
    "recovering": (70.0, 80.0),
    "evaluating": (80.0, 92.0),
    "saving": (92.0, 100.0),
}


class LostOwnership(Exception):
    """This attempt no longer owns the job (re-queued by the reaper or finished elsewhere)."""


class JobState:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        job_id: str,
        attempt: int,
        min_write_interval: float = 1.0,
        cancel_poll_interval: float = 1.0,
        db_retry_seconds: float = 60.0,
    ) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.attempt = attempt
        self.stage: str | None = None
        self._last_write = 0.0
        self._last_poll = 0.0
        self._cancel = False
        self._min_write = min_write_interval
        self._poll = cancel_poll_interval
        self._lock = threading.Lock()
        self.db_retry_seconds = db_retry_seconds

    def _write(self, fn: Any, what: str) -> Any:
        """Run one short transaction, riding out a database restart (up to db_retry_seconds)."""
        return retry_on_disconnect(fn, self.db_retry_seconds, f"job {self.job_id}: {what}")

    def _owned(self):  # type: ignore[no-untyped-def]
        return (Job.id == self.job_id, Job.attempts == self.attempt, Job.status.in_(("running", "cancelling")))

    def _update(self, session: Session, **values: Any) -> None:
        if session.execute(update(Job).where(*self._owned()).values(**values)).rowcount == 0:
            raise LostOwnership(self.job_id)

    def progress(self, stage: str, fraction: float, message: str | None = None) -> None:
        """Engine progress callback: stage changes are events; percent updates are throttled."""
        low, high = STAGE_SPANS.get(stage, (0.0, 100.0))
        percent = low + (high - low) * min(max(fraction, 0.0), 1.0)
        now = time.monotonic()
        changed = stage != self.stage
        if not changed and now - self._last_write < self._min_write:
            return

        def write() -> None:
            with self._lock, session_scope(self.sessions) as session:
                self._update(session, stage=stage, progress=percent, heartbeat_at=utcnow())
                if changed:
                    add_event(session, self.job_id, "stage", message or f"stage {stage}", stage=stage)
                elif message:
                    add_event(session, self.job_id, "progress", message, stage=stage, data={"progress": percent})

        self._write(write, "progress")
        self.stage = stage
        self._last_write = now

    def heartbeat(self) -> None:
        with self._lock, session_scope(self.sessions) as session:
            self._update(session, heartbeat_at=utcnow())

    def should_cancel(self) -> bool:
        """True once someone asked to cancel; polls the row at most once per interval.

        Raises HandBack when this process is shutting down (workers/shutdown.py).
        """
        if shutdown.REQUESTED.is_set():
            raise shutdown.HandBack(self.job_id)
        now = time.monotonic()
        if not self._cancel and now - self._last_poll >= self._poll:
            self._last_poll = now

            def read() -> Job | None:
                with self.sessions() as session:
                    return session.get(Job, self.job_id)

            job = self._write(read, "cancel check")
            if job is None or job.attempts != self.attempt or job.status not in ("running", "cancelling"):
                raise LostOwnership(self.job_id)
            self._cancel = job.status == "cancelling"
        return self._cancel

    def log(self, message: str, data: dict | None = None) -> None:
        def write() -> None:
            with self._lock, session_scope(self.sessions) as session:
                add_event(session, self.job_id, "log", message, stage=self.stage, data=data)

        self._write(write, "log")

    def hand_back(self) -> None:
        """Return the job to `queued` with this attempt not counted (the process is shutting down)."""

        requeued = dict(status="queued", attempts=self.attempt - 1, stage=None, progress=0.0, worker=None)
        requeued.update(started_at=None, heartbeat_at=None)

        def write() -> None:
            with self._lock, session_scope(self.sessions) as session:
                # Only a running job goes back; one being cancelled is left for the cancel path.
                handed = session.execute(update(Job).where(*self._owned(), Job.status == "running").values(**requeued))
                if handed.rowcount == 0:
                    raise LostOwnership(self.job_id)
                message = "job handed back to the queue: its worker is shutting down (no attempt used)"
                data = {"status": "queued", "reason": "worker_shutdown"}
                add_event(session, self.job_id, "status", message, stage=self.stage, data=data)

        self._write(write, "hand back")

    def finish(self, session: Session, status: str, **values: Any) -> None:
        """Write a terminal status inside the caller's transaction (raises LostOwnership)."""
        with self._lock:
            self._update(session, status=status, finished_at=utcnow(), heartbeat_at=utcnow(), **values)
            add_event(session, self.job_id, "status", f"job {status}", stage=self.stage, data={"status": status})


class Heartbeat:
    """Background thread that keeps `heartbeat_at` fresh while long engine steps run."""

    def __init__(self, state: JobState, interval: float) -> None:
        self.state = state
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{state.job_id}", daemon=True)
        self.lost = False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.state.heartbeat()
            except LostOwnership:
                self.lost = True
                return
            except Exception:  # a transient DB error must not kill the job; the next beat retries
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
