"""Catch-up reads for SSE streams, shared by every stream of a job in this process.

A stream reads the store when it opens (to resume after `Last-Event-ID`), when it sees a gap in
sequence numbers, and when a keep-alive finds that it missed something. Hundreds of dashboards
watching one job ask the same question at the same moment ("the events after N"): all of them
opening together after a restart, or all hearing the same event. Each read costs a thread and a
connection, and 500 of them at once starve the event loop of the GIL for seconds (measured:
polling p99 12 ms -> 1.7 s). So a page of events is read once and handed to every stream that asks
for it while it is current, already rendered as SSE frames.

A page is current while no event of its job has been heard in this process since it was read
(the job-view epoch, app.job_views) and for at most `max_age`, the bound for events heard late or
not at all (another process's event on a lost pub/sub message). A stream served a slightly old page
loses nothing: the next event then arrives as a gap, or the next keep-alive reads again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.job_views import JOB_VIEWS
from app.models import TERMINAL_STATUSES, Job, JobEvent
from app.schemas import EventOut
from app.singleflight import SingleFlight

PAGE_SIZE = 500  # events per read; a stream further behind reads the next page after sending one
CAPACITY = 4096  # pages kept per process (job, after) -> frames


def sse_frame(event: EventOut) -> str:
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {event.model_dump_json()}\n\n"


@dataclass(frozen=True)
class EventPage:
    frames: tuple[tuple[int, str], ...]  # (seq, SSE frame), in order
    terminal: bool  # the job has ended and no event is left after this page


def read_events(session: Session, job_id: str, after: int, limit: int = PAGE_SIZE) -> list[EventOut]:
    rows = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after).order_by(JobEvent.seq).limit(limit)
    ).all()
    return [EventOut.model_validate(row, from_attributes=True) for row in rows]


class EventPages:
    """LRU of (job, after) -> EventPage with its read time and job epoch; safe from any thread."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._pages: OrderedDict[tuple[str, int], tuple[EventPage, float, int]] = OrderedDict()
        self._reads: SingleFlight[EventPage] = SingleFlight()

    def _current(self, key: tuple[str, int], max_age: float) -> EventPage | None:
        with self._lock:
            entry = self._pages.get(key)
        if entry is None:
            return None
        page, read_at, epoch = entry
        if epoch != JOB_VIEWS.epoch(key[0]) or time.monotonic() - read_at > max_age:
            return None
        return page

    def read(self, sessions: sessionmaker[Session], job_id: str, after: int) -> EventPage:
        """From the store (in a worker thread); the page is kept for the streams that ask next."""
        started, epoch = time.monotonic(), JOB_VIEWS.epoch(job_id)
        with sessions() as session:
            events = read_events(session, job_id, after)
            status = session.scalar(select(Job.status).where(Job.id == job_id))
        page = EventPage(
            tuple((e.seq, sse_frame(e)) for e in events),
            terminal=len(events) < PAGE_SIZE and status in TERMINAL_STATUSES,
        )
        with self._lock:
            self._pages[(job_id, after)] = (page, started, epoch)
            self._pages.move_to_end((job_id, after))
            while len(self._pages) > self.capacity:
                self._pages.popitem(last=False)
        return page

    async def after(self, sessions: sessionmaker[Session], job_id: str, after: int, max_age: float) -> EventPage:
        """The events after `after`: a current page from memory, else one read shared by all who ask now."""
        page = self._current((job_id, after), max_age)
        if page is not None:
            return page
        # Keyed by epoch too: a caller who heard of a newer event must not join a read started before it.
        key = (job_id, after, JOB_VIEWS.epoch(job_id))
        return await self._reads.run(key, self.read, sessions, job_id, after)


EVENT_PAGES = EventPages()
