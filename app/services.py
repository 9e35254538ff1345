"""Process-wide handles the API needs: settings, database, Celery producer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery import Celery
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_session_factory
from app.events import HUB, Subscription, channel_name, make_publisher, publish_after_commit, redis_url
from app.settings import Settings
from workers.celery_app import RUN_JOB_TASK, make_celery

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    celery: Celery

    @classmethod
    def build(cls, settings: Settings) -> Services:
        settings.ensure_dirs()
        engine = make_engine(settings.resolved_database_url)
        return cls(settings, engine, session_factory(settings, engine), make_celery(settings))

    def watch_events(self) -> None:
        """Make sure this process hears every job event (workers and other API processes publish to Redis)."""
        url = redis_url(self.settings.resolved_broker_url)
        if url:
            HUB.ensure_redis_relay(url, channel_name(self.settings.queue_name))

    def subscribe(self, job_id: str, owner: str) -> Subscription:
        """A live feed of the job's events in this process (raises app.events.TooManyStreams)."""
        self.watch_events()
        return HUB.subscribe(job_id, owner, self.settings.max_streams_per_key)

    def enqueue(self, job_id: str) -> None:
        """Send the job to the workers; the task id is the job id (call only after the row is committed)."""
        self.celery.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=self.settings.queue_name)


def session_factory(settings: Settings, engine: Engine) -> sessionmaker[Session]:
    """Sessions whose committed job events are published to SSE subscribers (app.events)."""
    factory = make_session_factory(engine)
    publish_after_commit(factory, make_publisher(settings.resolved_broker_url, settings.queue_name))
    return factory
