"""Job event fan-out: what a committed event reaches, without a database connection per subscriber.

Every event is a row in `job_events` (the durable record: resume, history, `?after=`). Once its
transaction commits, it is also *published*:
- embedded mode: straight into this process's hub, where the API's SSE streams wait;
- with a Redis broker: on a Redis pub/sub channel; each API process relays that channel into its
  own hub, so one Redis subscription per process serves every stream it holds.

Pub/sub is fire-and-forget, so subscribers also catch up from the database on every heartbeat
and whenever they see a gap in sequence numbers; a lost message delays an event, never drops it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, sessionmaker

from app.job_views import JOB_VIEWS

log = logging.getLogger(__name__)
PENDING_KEY = "slimforge_pending_events"
Publisher = Callable[[dict[str, Any]], None]


class Subscription:
    def __init__(self, hub: Hub, job_id: str, owner: str, loop: asyncio.AbstractEventLoop) -> None:
        self.hub, self.job_id, self.owner, self.loop = hub, job_id, owner, loop
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)

    def deliver(self, payload: dict[str, Any]) -> None:
        """Called on the subscriber's loop. A full queue drops the event: the DB catch-up fills the gap."""
        try:
            self.queue.put_nowait(payload)
        except asyncio.QueueFull:
            pass

    def close(self) -> None:
        self.hub.unsubscribe(self)


class TooManyStreams(Exception):
    pass


class Hub:
    """In-process fan-out from publishers (any thread) to SSE subscribers (asyncio loops)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_job: dict[str, set[Subscription]] = defaultdict(set)
        self._per_owner: dict[str, int] = defaultdict(int)
        self._relays: set[str] = set()

    def subscribe(self, job_id: str, owner: str, limit: int) -> Subscription:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._per_owner[owner] >= limit:
                raise TooManyStreams(owner)
            sub = Subscription(self, job_id, owner, loop)
            self._by_job[job_id].add(sub)
            self._per_owner[owner] += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._by_job.get(sub.job_id)
            if subs is not None and sub in subs:
                subs.discard(sub)
                if not subs:
                    del self._by_job[sub.job_id]
                self._per_owner[sub.owner] -= 1

    def publish(self, payload: dict[str, Any]) -> None:
        JOB_VIEWS.invalidate(payload["job_id"])  # the next poll re-reads the row (app.job_views)
        with self._lock:
            subs = list(self._by_job.get(payload["job_id"], ()))
        by_loop: dict[asyncio.AbstractEventLoop, list[Subscription]] = defaultdict(list)
        for sub in subs:
            by_loop[sub.loop].append(sub)
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_paced, group, payload)
            except RuntimeError:  # that loop is closed; its subscriptions are going away
                pass

    def streams(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._by_job.values())

    def ensure_redis_relay(self, url: str, channel: str) -> None:
        """Start (once per process and channel) a thread relaying a Redis channel into this hub."""
        with self._lock:
            if channel in self._relays:
                return
            self._relays.add(channel)
        threading.Thread(
            target=_relay_forever, args=(self, url, channel), name=f"events-relay-{channel}", daemon=True
        ).start()


HUB = Hub()

# Streams woken per turn of the event loop. An event for a job that 500 dashboards watch would
# otherwise wake all 500 streams in one turn, and every poll arriving meanwhile waits for all of
# them to write (measured: polling p99 10 -> 100 ms). Each write costs ~0.3 ms in embedded mode,
# most of it waiting for the GIL back from the job's thread, so even 25 per turn stalled polls
# for ~8 ms at every progress event (p99 5 -> 10 ms with 500 streams); 2 per turn keeps the stall
# under a millisecond (p99 within 1.3x, bench/load.py); 250 streams take 125 turns.
DELIVERY_BATCH = 2


def _deliver_paced(subs: list[Subscription], payload: dict[str, Any], start: int = 0) -> None:
    end = start + DELIVERY_BATCH
    for sub in subs[start:end]:
        sub.deliver(payload)
    if len(subs) > end:  # the rest from an offset: no copy of the remaining list per turn
        asyncio.get_running_loop().call_soon(_deliver_paced, subs, payload, end)


def _relay_forever(hub: Hub, url: str, channel: str) -> None:
    import time

    import redis

    while True:
        try:
            client = redis.Redis.from_url(url, socket_keepalive=True, health_check_interval=30)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(channel)
            for message in pubsub.listen():
                if message.get("type") == "message":
                    hub.publish(json.loads(message["data"]))
        except Exception as exc:  # Redis restarting: subscribers catch up from the database meanwhile
            log.warning("event relay on %s lost Redis (%s); reconnecting", channel, exc)
            time.sleep(1.0)


class RedisPublisher:
    def __init__(self, url: str, channel: str) -> None:
        import redis

        self.channel = channel
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    def __call__(self, payload: dict[str, Any]) -> None:
        try:
            self.client.publish(self.channel, json.dumps(payload, default=str))
        except Exception as exc:  # the event is committed; subscribers will read it from the database
            log.debug("could not publish event %s/%s: %s", payload.get("job_id"), payload.get("seq"), exc)


def channel_name(queue_name: str) -> str:
    return f"slimforge:{queue_name}:events"


def redis_url(broker_url: str) -> str | None:
    return broker_url if broker_url.startswith(("redis://", "rediss://")) else None


def make_publisher(broker_url: str, queue_name: str) -> Publisher:
    url = redis_url(broker_url)
    return RedisPublisher(url, channel_name(queue_name)) if url else HUB.publish


def publish_after_commit(factory: sessionmaker[Session], publisher: Publisher) -> None:
    """Publish the events a session added (app.jobs_service.add_event) once its transaction commits."""

    def _after_commit(session: Session) -> None:
        for payload in session.info.pop(PENDING_KEY, ()):
            JOB_VIEWS.invalidate(payload["job_id"])  # this process at once; others via the publisher
            publisher(payload)

    def _after_rollback(session: Session) -> None:
        session.info.pop(PENDING_KEY, None)

    sa_event.listen(factory, "after_commit", _after_commit)
    sa_event.listen(factory, "after_rollback", _after_rollback)


def is_terminal_event(payload: dict[str, Any]) -> bool:
    from app.models import TERMINAL_STATUSES

    return payload.get("kind") == "status" and (payload.get("data") or {}).get("status") in TERMINAL_STATUSES
