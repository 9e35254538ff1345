"""A running job's view of its database row: claim, progress, heartbeat, cancel checks, finish.

Every write is conditioned on (status running/cancelling, this attempt), so a worker that lost its
job (the reaper re-queued it after a missed heartbeat) can never overwrite the new attempt.

Progress is one number over the whole job: the job's phases (load, calibrate, dense evaluation,
score, prune, compensate, recover, pruned evaluation, save) each get a share proportional to their
expected cost (`ProgressPlan`), the number only ever moves forward, and an ETA follows from the
rate measured so far.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.db import retry_on_disconnect, session_scope
from app.jobs_service import add_event
from app.models import Job, utcnow
from workers import shutdown

# A job's phases in order; "evaluating" appears twice (the dense model, then the pruned one).
PHASES = (
    "loading_model",
    "calibrating",
    "evaluating",
    "scoring",
    "pruning",
    "compensating",
    "recovering",
    "evaluating",
    "saving",
)
# Expected cost of each phase in units of one forward+backward of the calibration batch, for the
# quickstart-sized job on CPU (measured in bench/first_job.py); only the ratios matter.
DEFAULT_COSTS = {
    "loading_model": 0.3,
    "calibrating": 1.3,
    "scoring": 6.0,
    "pruning": 0.5,
    "compensating": 1.0,
    "recovering": 0.0,
    "evaluating": 0.0,
    "saving": 0.3,
}


@dataclass
class ProgressPlan:
    """Each phase's [start, end) share of 0..100, from expected costs (a phase of cost 0 gets none)."""

    costs: list[float] = field(default_factory=lambda: [DEFAULT_COSTS[p] for p in PHASES])

    @classmethod
    def for_spec(cls, spec: dict[str, Any], n_layers: int | None = None) -> ProgressPlan:
        """Expected costs of one job: scoring passes, evaluation and recovery only when asked for."""
        options = spec.get("options") or {}
        cal = spec.get("calibration") or {}
        costs = dict(DEFAULT_COSTS)
        costs["calibrating"] = 1.3 if cal.get("source", "self_generated") == "self_generated" else 0.1
        if spec.get("sparsity_basis") == "layers" and n_layers:
            # A quality-targeted job has no target_sparsity: its largest candidate bounds the work.
            sparsity = spec.get("target_sparsity") or (spec.get("target") or {}).get("max_sparsity") or 0.2
            removed = max(1, round(sparsity * n_layers))
            # GradMAP and SLEB re-score once per removed layer; one-shot scores need one pass.
            iterative = spec.get("method") in ("gradmap", "sleb") and options.get("iterative", True)
            costs["scoring"] = float(removed if iterative else 1)
        if spec.get("method") == "llm_pruner":
            costs["scoring"] = 1.0  # one gradient pass over the calibration batch
        costs["compensating"] = 1.0 if options.get("compensation") else 0.0
        if options.get("recovery"):
            costs["recovering"] = 0.1 * float(options.get("recovery_steps", 50))
        if spec.get("recovery"):  # the job-level recovery stage (workers/engine/recovery)
            costs["recovering"] = 0.1 * float(spec["recovery"].get("steps") or 50)
        evaluation = spec.get("evaluation")
        eval_cost = 0.0
        if evaluation:
            eval_cost = 1.0 + 2.0 * len(evaluation.get("perplexity") or []) + 3.0 * len(evaluation.get("tasks") or [])
            eval_cost += 1.0 if evaluation.get("speed", True) else 0.0
        ordered = [costs[p] for p in PHASES]
        ordered[PHASES.index("evaluating")] = eval_cost
        ordered[len(PHASES) - 1 - PHASES[::-1].index("evaluating")] = eval_cost
        return cls(ordered)

    def span(self, phase: int) -> tuple[float, float]:
        total = sum(self.costs) or 1.0
        start = sum(self.costs[:phase]) / total * 100.0
        return start, start + self.costs[phase] / total * 100.0


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
        plan: ProgressPlan | None = None,
    ) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.attempt = attempt
        self.stage: str | None = None
        self.percent = 0.0
        self.plan = plan or ProgressPlan()
        self._phase = 0
        self._started = time.monotonic()
        self._last_write = 0.0
        self._last_poll = 0.0
        self._cancel = False
        self._min_write = min_write_interval
        self._poll = cancel_poll_interval
        self._lock = threading.Lock()
        self.db_retry_seconds = db_retry_seconds
        # (time, percent) of the last engine report, and the percent its step may advance to.
        self._report: tuple[float, float] = (self._started, 0.0)
        self._step_rate: float | None = None  # percent per second inside the current stage
        self._step_size = 0.0  # percent between the last two reports of the current stage

    def _write(self, fn: Any, what: str) -> Any:
        """Run one short transaction, riding out a database restart (up to db_retry_seconds)."""
        return retry_on_disconnect(fn, self.db_retry_seconds, f"job {self.job_id}: {what}")

    def _owned(self):  # type: ignore[no-untyped-def]
        return (Job.id == self.job_id, Job.attempts == self.attempt, Job.status.in_(("running", "cancelling")))

    def _update(self, session: Session, **values: Any) -> None:
        if session.execute(update(Job).where(*self._owned()).values(**values)).rowcount == 0:
            raise LostOwnership(self.job_id)

    def _phase_of(self, stage: str) -> int:
        """The phase `stage` names, searching forward only: a stage never moves progress back."""
        for index in range(self._phase, len(PHASES)):
            if PHASES[index] == stage:
                return index
        return self._phase

    def eta_seconds(self) -> float | None:
        elapsed = time.monotonic() - self._started
        if self.percent < 1.0 or elapsed < 1.0:
            return None
        return round(elapsed * (100.0 - self.percent) / self.percent, 1)

    def progress(self, stage: str, fraction: float, message: str | None = None) -> None:
        """Engine progress callback: stage changes are events; percent updates are throttled."""
        phase = self._phase_of(stage)
        low, high = self.plan.span(phase)
        now = time.monotonic()
        percent = max(self.percent, low + (high - low) * min(max(fraction, 0.0), 1.0))
        if stage == self.stage and percent > self._report[1]:
            # Measured pace and step of this stage, used to move the number between sparse reports.
            self._step_rate = (percent - self._report[1]) / max(now - self._report[0], 1e-3)
            self._step_size = percent - self._report[1]
        elif stage != self.stage:
            self._step_rate = None
        self._report = (now, percent)
        self._phase = phase
        changed = stage != self.stage
        if not changed and not message and now - self._last_write < self._min_write:
            self.percent = percent
            return
        self._write(lambda: self._write_progress(stage, percent, message, changed), "progress")
        self.stage = stage
        self._last_write = now

    def _write_progress(self, stage: str, percent: float, message: str | None, changed: bool) -> None:
        with self._lock, session_scope(self.sessions) as session:
            self.percent = max(self.percent, percent)
            self._update(session, stage=stage, progress=self.percent, heartbeat_at=utcnow())
            data = {"progress": round(self.percent, 2), "eta_seconds": self.eta_seconds()}
            if changed:
                add_event(session, self.job_id, "stage", message or f"stage {stage}", stage=stage, data=data)
            elif message:
                add_event(session, self.job_id, "progress", message, stage=stage, data=data)

    def tick(self) -> None:
        """Between engine reports, advance at the stage's measured pace, never past its own phase.

        Called by the heartbeat thread, so a long step (one scoring pass, one evaluation) still
        moves the number at least once per heartbeat; it stops short of the phase's end, so the
        next real report is never behind it.
        """
        if self.stage is None or self._step_rate is None:
            self.heartbeat()
            return
        high = self.plan.span(self._phase)[1]
        reported_at, reported = self._report
        guess = reported + self._step_rate * (time.monotonic() - reported_at)
        # Stay below the next checkpoint: at most 90 % of one more step, and inside the phase.
        percent = min(guess, reported + 0.9 * self._step_size, reported + 0.9 * (high - reported))
        if percent <= self.percent + 0.01:
            self.heartbeat()
            return
        with self._lock, session_scope(self.sessions) as session:
            self.percent = percent
            self._update(session, progress=self.percent, heartbeat_at=utcnow())

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
                self.state.tick()
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
