"""API keys: `Authorization: Bearer <key>`; only the sha256 of a key is stored.

A generated key reads `sf_<public id>_<secret>`: the public id (stored in clear, shown in listings
and logs) names the key, the secret never leaves the hash. A key chosen by an operator (the
bootstrap key) has no public id; it is named by a fragment of its hash instead.

Authentication is on every request, so verified keys are kept in a small in-process TTL cache:
a poll costs no database round trip. Revoking a key clears it from this process's cache at once
and from every other process within `KEY_CACHE_TTL_SECONDS`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time

from fastapi import Request
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.errors import ApiError
from app.models import DEFAULT_TENANT, ApiKey, Tenant
from app.tenants import validate_tenant_id

KEY_PREFIX = "sf_"
KEY_CACHE_TTL_SECONDS = 10.0
_GENERATED_KEY = re.compile(r"^sf_([0-9a-f]{12})_[A-Za-z0-9_-]{20,}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return f"{KEY_PREFIX}{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def public_id(key: str) -> str:
    """The part of a key that may be stored and shown in clear."""
    match = _GENERATED_KEY.match(key)
    return match.group(1) if match else "h" + hash_key(key)[:11]


def ensure_tenant(session: Session, tenant_id: str) -> None:
    validate_tenant_id(tenant_id)  # tenant names become directory names
    if session.get(Tenant, tenant_id) is None:
        session.add(Tenant(id=tenant_id))
        session.flush()


def create_key(session: Session, tenant_id: str, name: str = "", key: str | None = None) -> str:
    """Store a new key for a tenant (creating the tenant if needed) and return the plaintext key once."""
    key = key or generate_key()
    ensure_tenant(session, tenant_id)
    session.add(ApiKey(tenant_id=tenant_id, key_hash=hash_key(key), prefix=public_id(key), name=name))
    session.flush()
    return key


def revoke_key(session: Session, key_or_public_id: str) -> int:
    """Revoke by public id (or by the key itself); returns how many keys were revoked."""
    ident = key_or_public_id.strip()
    condition = ApiKey.key_hash == hash_key(ident) if ident.startswith(KEY_PREFIX) else ApiKey.prefix == ident
    hashes = session.scalars(select(ApiKey.key_hash).where(condition)).all()
    session.execute(update(ApiKey).where(condition).values(revoked=True))
    for digest in hashes:
        KEY_CACHE.forget(digest)
    return len(hashes)


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


class KeyCache:
    """key hash -> (tenant, expiry). Only valid keys are cached; misses always ask the database.

    An entry is due for a refresh in the last quarter of its life (`due`): the API re-reads it then,
    in the background, while requests keep using it. Letting it expire instead sends every request
    in flight to the database at the same instant (measured: ~100 requests at once, 1-1.8 s each,
    every 10 s under a saturating load).
    """

    def __init__(self, ttl: float = KEY_CACHE_TTL_SECONDS, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> str | None:
        entry = self._entries.get(digest)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def due(self, digest: str) -> bool:
        entry = self._entries.get(digest)
        return entry is not None and entry[1] - time.monotonic() < self.ttl / 4

    def put(self, digest: str, tenant: str) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # bounded memory; the next requests refill it
            self._entries[digest] = (tenant, time.monotonic() + self.ttl)

    def forget(self, digest: str) -> None:
        with self._lock:
            self._entries.pop(digest, None)


KEY_CACHE = KeyCache()


def bearer_digest(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "unauthorized", "Missing API key: send 'Authorization: Bearer <key>'.")
    return hash_key(key.strip())


def lookup_tenant(sessions: sessionmaker[Session], digest: str) -> str:
    """The tenant of a valid key (database read, then cached); 401 otherwise."""
    with session_scope(sessions) as session:
        row = session.execute(select(ApiKey.tenant_id, ApiKey.revoked).where(ApiKey.key_hash == digest)).first()
    if row is None or row.revoked:
        raise ApiError(401, "unauthorized", "Invalid or revoked API key.")
    KEY_CACHE.put(digest, row.tenant_id)
    return row.tenant_id


def tenant_for_request(request: Request, sessions: sessionmaker[Session]) -> str:
    """The caller's tenant, for code already running in a worker thread (the cache first)."""
    digest = bearer_digest(request)
    return KEY_CACHE.get(digest) or lookup_tenant(sessions, digest)
