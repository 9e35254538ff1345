"""FastAPI dependencies: services, a database session per request, the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.auth import tenant_for_request
from app.services import Services


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_session(services: Annotated[Services, Depends(get_services)]) -> Iterator[Session]:
    session = services.sessions()
    try:
        yield session
    finally:
        session.close()


def get_tenant(request: Request, session: Annotated[Session, Depends(get_session)]) -> str:
    return tenant_for_request(request, session)


ServicesDep = Annotated[Services, Depends(get_services)]
SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[str, Depends(get_tenant)]
