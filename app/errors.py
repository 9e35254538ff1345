"""Errors as RFC 9457 `application/problem+json`, with a stable `code` clients can switch on."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from workers.engine.types import EngineError

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger(__name__)
BODY_PARSE_ERROR = "There was an error parsing the body"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How the databases word a full disk: SQLite's SQLITE_FULL, PostgreSQL's "could not extend file".
DISK_FULL_MESSAGES = ("database or disk is full", "no space left on device", "could not extend file")

# Engine error codes that mean "the request was wrong" map to 4xx statuses.
ENGINE_ERROR_STATUS = {
    "unknown_model": 422,
    "model_not_installed": 422,
    "invalid_model": 422,
    "path_not_allowed": 403,
    "unknown_method": 422,
    "invalid_sparsity": 422,
    "invalid_options": 422,
    "unsupported_architecture": 422,
}


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.extra = extra


def problem(status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {
        "type": f"https://slimforge.dev/problems/{code}",
        "title": code.replace("_", " "),
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _validation_detail(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    errors = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err.get("loc", ()) if part != "body")
        errors.append({"field": loc, "message": err.get("msg", "")})
    if any(err.get("type") == "json_invalid" for err in exc.errors()):
        return "The request body is not valid JSON.", errors
    summary = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors[:5])
    return f"Invalid request: {summary}", errors


def is_disk_full(exc: BaseException) -> bool:
    """True if `exc` or anything in its cause chain is a full disk or an exhausted disk quota."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in DISK_FULL_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False


def no_space_left(path: Path, reserve_bytes: int = 1 << 20) -> bool:
    """True if the filesystem holding `path` has less than `reserve_bytes` free for us.

    For libraries that lose the ENOSPC on the way up (kombu's filesystem transport retries a
    failed write and then raises an unrelated error), the disk itself is the evidence.
    """
    try:
        usage = os.statvfs(path)
    except OSError:
        return False
    return usage.f_bavail * usage.f_frsize < reserve_bytes


def insufficient_storage() -> JSONResponse:
    return problem(
        507,
        "insufficient_storage",
        "The server's disk is full, so nothing was stored; try again later or ask the operator to free space.",
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return problem(exc.status, exc.code, exc.detail, headers=exc.headers, **exc.extra)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _database_down(_request: Request, exc: Exception) -> JSONResponse:
        if is_disk_full(exc):
            log.warning("disk full: %s", exc)
            return insufficient_storage()
        # A restarting or unreachable database is a temporary condition, not a server bug.
        log.warning("database unavailable: %s", exc.__class__.__name__)
        return problem(
            503,
            "database_unavailable",
            "The job store is unreachable right now; retry in a few seconds.",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(EngineError)
    async def _engine_error(_request: Request, exc: EngineError) -> JSONResponse:
        return problem(ENGINE_ERROR_STATUS.get(exc.code, 422), exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, errors = _validation_detail(exc)
        code = "malformed_json" if detail.startswith("The request body is not valid JSON") else "validation_error"
        return problem(400 if code == "malformed_json" else 422, code, detail, errors=errors)

    @app.exception_handler(OSError)
    async def _storage(_request: Request, exc: Exception) -> JSONResponse:
        if is_disk_full(exc):
            log.warning("disk full: %s", exc)
            return insufficient_storage()
        log.exception("unexpected error", exc_info=exc)
        return problem(500, "internal_error", "The server failed unexpectedly; the error has been logged.")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == BODY_PARSE_ERROR:
            # FastAPI's answer when the JSON parser itself fails, e.g. on a body nested too deeply.
            code, detail = "malformed_json", "The request body could not be parsed (malformed or nested too deeply)."
        return problem(exc.status_code, code, detail, headers=getattr(exc, "headers", None))
