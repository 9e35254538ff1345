"""Response declarations shared by the routers, so the OpenAPI document lists what routes really return.

Every error body is RFC 9457 `application/problem+json` (see app/errors.py); each status below
says which of our codes it carries. Routers declare the statuses any of their routes can give
(auth, validation, rate limiting); routes add their own.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from app.errors import PROBLEM_JSON


class Problem(BaseModel):
    """An error: `code` is stable for clients to switch on, `detail` says what to do."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    code: str
    detail: str


PROBLEM_DESCRIPTIONS: dict[int, str] = {
    400: "Malformed request: invalid JSON, a control character in an id or query, a bad cursor or header",
    401: "Missing, invalid or revoked API key (`unauthorized`)",
    403: "Not allowed: a model path outside the allowed roots, a hub id not allow-listed, a bad metrics token",
    404: "No such resource for this tenant",
    409: "Conflict with the current state (idempotency key reuse, job not retryable)",
    413: "Request body over the upload limit (`upload_too_large`)",
    415: "Unsupported upload format",
    416: "Range not satisfiable",
    422: "Invalid request content (`validation_error` and specific codes)",
    429: "Rate limit (`rate_limited`, with Retry-After) or active-job quota (`job_quota_exceeded`)",
    503: "A dependency is down (`broker_unavailable`, `not_ready`)",
    507: "Disk full (`insufficient_storage`) or tenant storage quota (`storage_quota_exceeded`)",
}

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def problem_response(status: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "description": PROBLEM_DESCRIPTIONS[status],
        "content": {PROBLEM_JSON: {"schema": Problem.model_json_schema()}},
    }
    if status == 429:
        entry["headers"] = RETRY_AFTER
    return entry


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a router or route: problem+json bodies for these statuses."""
    return {status: problem_response(status) for status in statuses}


# Routers under /v1: auth, validation, the input guard and the rate limiter apply to every route.
V1_RESPONSES = responses(400, 401, 422, 429)


def binary_response(description: str, media_type: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string", "format": "binary"}}}}


def text_response(description: str, media_type: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


def empty_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {}}
