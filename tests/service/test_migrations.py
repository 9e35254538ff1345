"""Alembic: upgrade head and downgrade base on both stores, and the models match the migrations."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.db import make_engine
from app.migrate import downgrade, upgrade
from app.models import Base

TABLES = {"tenants", "api_keys", "datasets", "jobs", "job_events", "artifacts", "artifact_files"}


def test_upgrade_head_matches_models_and_downgrade_base_removes_everything(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        downgrade(database_url)
        assert not TABLES & set(inspect(engine).get_table_names())
        upgrade(database_url)  # and back up again from nothing
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
