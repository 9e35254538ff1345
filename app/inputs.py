"""Input checks shared by the routes: control characters, database integer bounds, SSE cursors.

PostgreSQL refuses NUL in text and SQLite stores it silently; neither belongs in an id, a name or
a query, so such input is refused up front with a 4xx instead of failing deep in the driver.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

from fastapi import Query
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ApiError, problem

# Largest value of a signed 32-bit column (event sequence numbers, counts): larger ones cannot match.
DB_INT_MAX = 2**31 - 1
# `?after=` of the event routes: a sequence number, bounded to what the column can hold.
EventCursor = Annotated[int, Query(ge=0, le=DB_INT_MAX, description="return events with seq > after")]
# Free text may keep tab and newlines; identifiers may not.
TEXT_WHITESPACE = frozenset("\t\n\r")


def first_control_char(value: str, allow: frozenset[str] = frozenset()) -> str | None:
    """The first control (Cc) character of `value`, or None; also catches U+0085 and DEL."""
    for char in value:
        if char not in allow and unicodedata.category(char) == "Cc":
            return char
    return None


def control_char_error(value: Any, allow: frozenset[str] = frozenset(), where: str = "") -> str | None:
    """Walk JSON-like data (keys too); a message naming the first control character found, or None."""
    if isinstance(value, str):
        char = first_control_char(value, allow)
        return None if char is None else f"{where or 'value'} contains the control character U+{ord(char):04X}"
    if isinstance(value, dict):
        for key, item in value.items():
            found = control_char_error(str(key), frozenset(), f"{where}.{key!s}".strip(".") + " (key)")
            found = found or control_char_error(item, allow, f"{where}.{key!s}".strip("."))
            if found:
                return found
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = control_char_error(item, allow, f"{where}[{index}]")
            if found:
                return found
    return None


def non_finite_error(value: Any, where: str = "") -> str | None:
    """A message naming the first NaN/Infinity in JSON-like data, or None.

    Python's JSON parser accepts these non-standard tokens, but PostgreSQL's JSON type does not.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where or 'value'} is {value}, which is not a JSON number"
    if isinstance(value, dict):
        return next((e for k, v in value.items() if (e := non_finite_error(v, f"{where}.{k}".strip(".")))), None)
    if isinstance(value, list | tuple):
        return next((e for i, v in enumerate(value) if (e := non_finite_error(v, f"{where}[{i}]"))), None)
    return None


def require_plain_text(value: str | None, field: str) -> None:
    """Refuse an identifier or name that carries a control character (400 `invalid_characters`)."""
    if value is not None and (char := first_control_char(value)) is not None:
        raise ApiError(
            400,
            "invalid_characters",
            f"{field} contains the control character U+{ord(char):04X}; use printable characters only.",
        )


def parse_last_event_id(header: str | None, after: int) -> int:
    """The sequence number to resume an event stream after: `Last-Event-ID` wins over `?after=`.

    The header is what the browser echoes from our own `id:` lines, so anything but a bounded
    non-negative integer is a client bug answered 400, never a 500 from int() or the database.
    """
    if header is None or not header.strip():
        return after
    value = header.strip()
    if not value.isascii() or not value.isdigit() or int(value) > DB_INT_MAX:
        raise ApiError(
            400,
            "invalid_last_event_id",
            f"Last-Event-ID must be an event sequence number between 0 and {DB_INT_MAX}; "
            "send back the id of the last event received, or omit the header.",
        )
    return int(value)


class ControlCharGuard:
    """ASGI middleware: a path or query string with a (percent-decoded) control character is a 400."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw_query = scope.get("query_string", b"").replace(b"+", b" ")
            query = unquote_to_bytes(raw_query).decode("utf-8", "replace")
            for where, value in (("The URL path", scope.get("path", "")), ("The query string", query)):
                char = first_control_char(value)
                if char is not None:
                    response = problem(
                        400,
                        "invalid_characters",
                        f"{where} contains the control character U+{ord(char):04X}; "
                        "ids and query values must be printable.",
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
