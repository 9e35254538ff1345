"""Tenant names: they become directory names under the data directory, so only a safe alphabet."""

from __future__ import annotations

import re
from pathlib import Path

# Lower-case letters, digits, '-' and '_'; starts and ends alphanumeric; fits tenants.id (64).
TENANT_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?")


class InvalidTenant(ValueError):
    pass


def validate_tenant_id(tenant_id: str) -> str:
    """Return the name unchanged, or raise InvalidTenant saying what is allowed."""
    if not TENANT_PATTERN.fullmatch(tenant_id):
        raise InvalidTenant(
            f"Invalid tenant name {tenant_id!r}: use 1-64 lower-case letters, digits, '-' or '_', "
            "starting and ending with a letter or digit."
        )
    return tenant_id


def tenant_dir(base: Path, tenant_id: str) -> Path:
    """The tenant's directory under `base`; refuses a name that could leave it (defence in depth)."""
    return base / validate_tenant_id(tenant_id)
