"""ASGI middleware bounding how many requests start their work in one turn of the event loop.

Under a closed-loop load every turn of the loop first runs the request tasks created in the turn
before, each of which (a cached job poll never awaits) runs to its end, and only then reads the
sockets that became ready. A turn with 200 such requests is ~80 ms of work, and a `/healthz` probe
(answered as soon as it is read, app.health_protocol) waits that whole turn: p99 ~100 ms in both
modes under saturation. Past `per_turn` requests a request task yields once to the next turn, so a
turn holds at most `per_turn` requests' work plus cheap yields, and sockets are read in between.
Throughput and the order of requests stay as they were: deferred requests keep their place ahead
of newer ones.
"""

from __future__ import annotations

import asyncio
import weakref

from starlette.types import ASGIApp, Receive, Scope, Send


class _TurnBudget:
    """Requests started in the current turn of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.used = 0

    def take(self) -> None:
        if self.used == 0:
            # The turn's first request: scheduled before any request of this turn defers, so the
            # count is reset first thing in the next turn.
            self.loop.call_soon(self._reset)
        self.used += 1

    def _reset(self) -> None:
        self.used = 0


class TurnBudget:
    def __init__(self, app: ASGIApp, per_turn: int) -> None:
        self.app = app
        self.per_turn = per_turn
        self._budgets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _TurnBudget] = weakref.WeakKeyDictionary()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.per_turn > 0:
            loop = asyncio.get_running_loop()
            budget = self._budgets.get(loop)
            if budget is None:
                budget = self._budgets[loop] = _TurnBudget(loop)
            while budget.used >= self.per_turn:
                await asyncio.sleep(0)  # exactly one turn: the sockets are read before this runs again
            budget.take()
        await self.app(scope, receive, send)
