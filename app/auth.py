"""API keys: `Authorization: Bearer <key>`; only the sha256 of a key is stored."""

from __future__ import annotations

import hashlib
import secrets

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import DEFAULT_TENANT, ApiKey, Tenant

KEY_PREFIX = "sf_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def ensure_tenant(session: Session, tenant_id: str) -> None:
    if session.get(Tenant, tenant_id) is None:
        session.add(Tenant(id=tenant_id))
        session.flush()


def create_key(session: Session, tenant_id: str, name: str = "", key: str | None = None) -> str:
    """Store a new key for a tenant (creating the tenant if needed) and return the plaintext key once."""
    key = key or generate_key()
    ensure_tenant(session, tenant_id)
    session.add(ApiKey(tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:8], name=name))
    session.flush()
    return key


def bootstrap_keys(session: Session, bootstrap_key: str | None) -> str | None:
    """Make sure the default tenant can authenticate.

    With SLIMFORGE_BOOTSTRAP_KEY set, that key is registered (idempotently). With none set and no
    key stored yet, a key is generated and returned so the caller can print it once.
    """
    ensure_tenant(session, DEFAULT_TENANT)
    if bootstrap_key:
        if session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(bootstrap_key))) is None:
            create_key(session, DEFAULT_TENANT, name="bootstrap", key=bootstrap_key)
        return None
    if session.scalar(select(ApiKey.id).limit(1)) is None:
        return create_key(session, DEFAULT_TENANT, name="generated at first start")
    return None


def tenant_for_request(request: Request, session: Session) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "unauthorized", "Missing API key: send 'Authorization: Bearer <key>'.")
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key.strip())))
    if row is None or row.revoked:
        raise ApiError(401, "unauthorized", "Invalid or revoked API key.")
    return row.tenant_id
