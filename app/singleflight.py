"""One threadpool call shared by every concurrent caller that asks the same question."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """While a call for `key` is in flight on this loop, later callers await its result instead.

    Keyed per event loop too: a future belongs to the loop that made it (tests run several).
    """

    def __init__(self) -> None:
        self._pending: dict[Hashable, tuple[asyncio.AbstractEventLoop, asyncio.Future[T]]] = {}

    def in_flight(self, key: Hashable) -> bool:
        """Whether a call for `key` is running on this loop now."""
        pending = self._pending.get(key)
        return pending is not None and pending[0] is asyncio.get_running_loop()

    async def run(self, key: Hashable, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        pending = self._pending.get(key)
        if pending is None or pending[0] is not loop:
            future: asyncio.Future[T] = asyncio.ensure_future(run_in_threadpool(fn, *args))
            self._pending[key] = pending = (loop, future)

            def forget(done: asyncio.Future[T]) -> None:
                if self._pending.get(key, (None, None))[1] is done:
                    del self._pending[key]

            future.add_done_callback(forget)
        # Shielded: one caller going away (a closed stream) must not cancel the others' read.
        return await asyncio.shield(pending[1])
