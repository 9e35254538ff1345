"""FastAPI dependencies: services, a database session per request, the caller's tenant.

Both request-scoped dependencies are async on purpose. A sync generator dependency would open its
session in one threadpool hop and close it in another; under load the closes then queue behind
requests that wait for the connections those sessions still hold, and the API deadlocks. Here a
route body is the only thread hop, and the session is closed on the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth import KEY_CACHE, bearer_digest, lookup_tenant
from app.services import Services


async def get_services(request: Request) -> Services:
    # async on purpose: FastAPI runs a plain `def` dependency in the threadpool, one hop per request.
    return request.app.state.services


async def get_session(services: Annotated[Services, Depends(get_services)]) -> AsyncIterator[Session]:
    session = services.sessions()  # no connection until the route's first statement
    try:
        yield session
    finally:
        session.close()


async def get_tenant(request: Request, services: Annotated[Services, Depends(get_services)]) -> str:
    digest = bearer_digest(request)
    tenant = KEY_CACHE.get(digest)
    if tenant is None:
        tenant = await run_in_threadpool(lookup_tenant, services.sessions, digest)
    return tenant


ServicesDep = Annotated[Services, Depends(get_services)]
SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[str, Depends(get_tenant)]
