"""Celery tasks. The task only wires settings and the database to the job runner."""

from __future__ import annotations

from functools import cache

from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine
from app.heap import freeze_long_lived
from app.services import session_factory
from app.settings import get_settings
from workers.celery_app import RUN_JOB_TASK, celery_app
from workers.runner import HANDED_BACK, run_job


@cache
def _sessions() -> sessionmaker[Session]:
    settings = get_settings()
    return session_factory(settings, make_engine(settings.resolved_database_url))


@celery_app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_job_task(job_id: str) -> str | None:
    settings = get_settings()
    status = run_job(job_id, settings, _sessions())
    freeze_long_lived()  # the modules and caches a job loaded stay; the API threads stop paying for them
    if status == HANDED_BACK:  # this worker is stopping: put the job back in the queue for the next one
        celery_app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=settings.queue_name)
    return status
