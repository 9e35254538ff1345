"""Service settings, read from `SLIMFORGE_*` environment variables (pydantic-settings).

With nothing set, everything lives under the data directory: an SQLite store, a filesystem
Celery broker and the artifact files — the embedded default.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_paths(value: object) -> object:
    if isinstance(value, str):
        return [Path(p) for p in value.split(":") if p]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIMFORGE_", extra="ignore")

    data_dir: Path = Field(default=Path.home() / ".slimforge", description="datasets, artifacts, model cache")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir")
    broker_url: str | None = Field(default=None, description="Celery broker; default filesystem queue in data_dir")
    bootstrap_key: str | None = Field(default=None, description="first API key, valid for the default tenant")
    webhook_secret: str | None = Field(default=None, description="HMAC secret signing job webhooks")
    # Local model directories a job may name; colon-separated in the environment.
    allowed_model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Where evaluation texts and zero-shot sets live (wikitext2-valid.txt, eval/...).
    eval_data_dir: Path | None = None
    max_upload_bytes: int = 64 * 2**20
    max_attempts: int = 2
    heartbeat_seconds: float = 10.0
    # A running job whose heartbeat is older than this is considered lost (worker died).
    heartbeat_timeout_seconds: float = 120.0
    reaper_interval_seconds: float = 15.0
    # Longer than any job: a message unacked this long is redelivered by Redis.
    broker_visibility_timeout_seconds: int = 6 * 3600
    device: str = "auto"
    queue_name: str = "slimforge"
    # Load and fault tolerance (docs/reliability.md).
    # Concurrent SSE streams one API key may hold in one API process (429 beyond).
    max_streams_per_key: int = 256
    # SSE keep-alive comment interval; each one also re-reads missed events from the database.
    sse_heartbeat_seconds: float = 15.0
    # A job still `queued` this long after it was last sent is re-sent unless the broker holds it.
    requeue_grace_seconds: float = 30.0
    # How long workers keep retrying while the database is unreachable (e.g. restarting).
    db_retry_seconds: float = 60.0
    # On SIGTERM, how long to wait for the running job to hand itself back to the queue.
    shutdown_grace_seconds: float = 60.0

    @field_validator("allowed_model_roots", mode="before")
    @classmethod
    def _parse_roots(cls, value: object) -> object:
        return _split_paths(value)

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'slimforge.db'}"

    @cached_property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def eval_cache_dir(self) -> Path:
        return self.data_dir / "eval-cache"

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.models_dir, self.datasets_dir, self.artifacts_dir, self.tmp_dir):
            path.mkdir(parents=True, exist_ok=True)
        if self.embedded_broker:
            (self.broker_dir / "queue").mkdir(parents=True, exist_ok=True)
            (self.broker_dir / "processed").mkdir(parents=True, exist_ok=True)
            (self.broker_dir / "control").mkdir(parents=True, exist_ok=True)


def get_settings() -> Settings:
    return Settings()
