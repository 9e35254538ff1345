"""api key public ids; composite index for tenant job listings

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 21:30:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # `prefix` used to hold the first characters of the key itself; keep only a hash fragment.
    op.execute("UPDATE api_keys SET prefix = 'h' || substr(key_hash, 1, 11)")
    # GET /v1/jobs filters by tenant and orders by (created_at, id): one index range scan.
    op.create_index("ix_jobs_tenant_created", "jobs", ["tenant_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_created", table_name="jobs")
