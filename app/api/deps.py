"""FastAPI dependencies: services, a database session per request, the caller's tenant.

Both request-scoped dependencies are async on purpose. A sync generator dependency would open its
session in one threadpool hop and close it in another; under load the closes then queue behind
requests that wait for the connections those sessions still hold, and the API deadlocks. Here a
route body is the only thread hop, and the session is closed on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.auth import KEY_CACHE, bearer_digest, lookup_tenant
from app.errors import ApiError
from app.services import Services
from app.singleflight import SingleFlight

log = logging.getLogger(__name__)


async def get_services(request: Request) -> Services:
    # async on purpose: FastAPI runs a plain `def` dependency in the threadpool, one hop per request.
    return request.app.state.services


async def get_session(services: Annotated[Services, Depends(get_services)]) -> AsyncIterator[Session]:
    session = services.sessions()  # no connection until the route's first statement
    try:
        yield session
    finally:
        session.close()


# Key lookups in flight, shared: a burst of requests with one uncached key costs one read.
_LOOKUPS: SingleFlight[str] = SingleFlight()
_REFRESHES: set[asyncio.Task[None]] = set()  # referenced until done (the loop holds tasks weakly)


async def _refresh_key(services: Services, digest: str) -> None:
    try:
        await _LOOKUPS.run(digest, lookup_tenant, services.sessions, digest)
    except ApiError:  # revoked meanwhile: the next request reads it again and gets its 401
        KEY_CACHE.forget(digest)
    except Exception as exc:  # the database is away: the entry serves until it expires
        log.warning("could not refresh a cached API key: %s", exc)


async def get_tenant(request: Request, services: Annotated[Services, Depends(get_services)]) -> str:
    digest = bearer_digest(request)
    tenant = KEY_CACHE.get(digest)
    if tenant is None:
        return await _LOOKUPS.run(digest, lookup_tenant, services.sessions, digest)
    if KEY_CACHE.due(digest) and not _LOOKUPS.in_flight(digest):
        task = asyncio.create_task(_refresh_key(services, digest))
        _REFRESHES.add(task)
        task.add_done_callback(_REFRESHES.discard)
    return tenant


ServicesDep = Annotated[Services, Depends(get_services)]
SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[str, Depends(get_tenant)]
