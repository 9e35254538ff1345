"""The Celery application: Redis (or any broker URL) in production, a filesystem queue embedded.

GPU-friendly defaults: a worker takes one job at a time (prefetch 1, solo pool), acknowledges it
only when done (acks_late) and the broker's visibility timeout is longer than any job, so a job
whose worker dies is redelivered; the reaper (workers/reaper.py) bounds how long that takes.
"""

from __future__ import annotations

from celery import Celery

from app.settings import Settings, get_settings

RUN_JOB_TASK = "slimforge.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("slimforge", broker=settings.resolved_broker_url, set_as_current=False)
    transport_options: dict[str, object] = {"visibility_timeout": settings.broker_visibility_timeout_seconds}
    if settings.embedded_broker:
        queue_dir = str(settings.broker_dir / "queue")
        transport_options = {
            "data_folder_in": queue_dir,
            "data_folder_out": queue_dir,
            "processed_folder": str(settings.broker_dir / "processed"),
            "control_folder": str(settings.broker_dir / "control"),
            "store_processed": False,
        }
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_ignore_result=True,
        task_default_queue=settings.queue_name,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


celery_app = make_celery(get_settings())
# Register the task module with the app the `slimforge worker` command runs.
celery_app.conf.imports = ("workers.tasks",)
