"""Graceful shutdown: a worker asked to stop hands its running job back instead of losing it.

SIGTERM (a deploy, `docker stop`, Ctrl-C on `slimforge serve`) sets `REQUESTED`. The running job sees
it at its next cancel check, returns to `queued` without spending an attempt (only a lost heartbeat
counts as a failed attempt) and is re-sent to the broker, so another worker, or this one after its
restart, runs it again from the start.
"""

from __future__ import annotations

import threading

REQUESTED = threading.Event()
# Set while no job runs in this process, so a shutting-down server knows when it may exit.
IDLE = threading.Event()
IDLE.set()


class HandBack(Exception):
    """Raised inside a running job when its process is shutting down."""


def request() -> None:
    REQUESTED.set()


def wait_until_idle(timeout: float) -> bool:
    return IDLE.wait(timeout)
