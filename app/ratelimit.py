"""In-memory token-bucket rate limits, as ASGI middleware: per client address, per API key, and a
stricter budget for failed authentications per address.

Answers 429 `rate_limited` with Retry-After. Counting 401s here (from the status the app sends)
keeps the limiter independent of how authentication works. Limits are per process: with
`serve --workers N` a client gets up to N times the rates. Behind a reverse proxy, run uvicorn
with --proxy-headers/--forwarded-allow-ips so the client address is the real one.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import problem
from app.settings import Settings

# Probes must never be throttled: an orchestrator would restart a healthy but busy server.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz"})
MAX_TRACKED = 65_536  # buckets kept per kind; the least recently used are forgotten first


@dataclass
class Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """Buckets of `burst` tokens refilled at `rate` per second, keyed by a string (LRU-bounded)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _refilled(self, key: str, now: float) -> Bucket:
        bucket = self._buckets.pop(key, None) or Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        self._buckets[key] = bucket
        while len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
        return bucket

    def wait_time(self, key: str, now: float) -> float:
        """Seconds until one token is available (0 if one is available now); takes nothing."""
        if not self.enabled:
            return 0.0
        bucket = self._refilled(key, now)
        return 0.0 if bucket.tokens >= 1 else (1 - bucket.tokens) / self.rate

    def take(self, key: str, now: float) -> float:
        """Take one token; returns 0, or the seconds to wait when the bucket is empty (nothing taken)."""
        wait = self.wait_time(key, now)
        if wait == 0 and self.enabled:
            self._buckets[key].tokens -= 1
        return wait


def _key_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, key = value.partition(b" ")
            if scheme.lower() == b"bearer" and key.strip():
                # Only a digest is kept in memory, never the key itself.
                return hashlib.sha256(key.strip()).hexdigest()
    return None


class RateLimit:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.per_address = TokenBuckets(settings.rate_limit_per_address, settings.rate_limit_per_address_burst)
        self.per_key = TokenBuckets(settings.rate_limit_per_key, settings.rate_limit_per_key_burst)
        self.auth_failures = TokenBuckets(settings.auth_failures_per_minute / 60.0, settings.auth_failures_burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        now = time.monotonic()
        client = scope.get("client")
        address = client[0] if client else "unknown"
        key = _key_id(scope)
        # An address that used up its failed-authentication budget is refused outright until it
        # refills, so guessing keys costs time; the other limits apply to every request.
        wait = self.auth_failures.wait_time(address, now)
        if wait:
            await self._refuse(scope, receive, send, wait, "too many failed authentications from this address")
            return
        wait = self.per_address.take(address, now)
        if not wait and key is not None:
            wait = self.per_key.take(key, now)
        if wait:
            await self._refuse(scope, receive, send, wait, "too many requests")
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                self.auth_failures.take(address, time.monotonic())
            await send(message)

        await self.app(scope, receive, counting_send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, wait: float, why: str) -> None:
        retry_after = max(1, math.ceil(wait))
        response = problem(
            429,
            "rate_limited",
            f"Rate limit reached ({why}); retry after {retry_after} s.",
            headers={"Retry-After": str(retry_after)},
        )
        await response(scope, receive, send)
