"""The embedded default: one process serves the API and runs a Celery worker in a thread."""

from __future__ import annotations

import logging
import threading

from celery import Celery

log = logging.getLogger(__name__)


def start_worker_thread(app: Celery, queue: str) -> object:
    """Start a solo-pool Celery worker consuming `queue` in a daemon thread; returns the controller."""
    import workers.tasks  # noqa: F401  (registers the task on the app)

    controller = app.WorkController(
        concurrency=1,
        pool_cls="solo",
        queues=[queue],
        hostname=f"embedded@{threading.get_native_id()}",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        loglevel="INFO",
    )
    thread = threading.Thread(target=controller.start, name="slimforge-embedded-worker", daemon=True)
    thread.start()
    log.info("embedded worker started on queue %s", queue)
    return controller
