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
    # A job poll may be answered from this process's memory for this long (app.job_views); status
    # changes reach it at once through the job events. 0: every poll reads the version from the store.
    job_read_max_age_seconds: float = Field(default=0.5, ge=0, le=10)
    # Requests that start their work in one turn of an API process's event loop; the rest wait one
    # turn, so sockets (a /healthz probe) are read in between under saturation (app.turns). 0: no bound.
    requests_per_loop_turn: int = Field(default=32, ge=0, le=10_000)
    # A job still `queued` this long after it was last sent is re-sent unless the broker holds it.
    requeue_grace_seconds: float = 30.0
    # How long workers keep retrying while the database is unreachable (e.g. restarting).
    db_retry_seconds: float = 60.0
    # On SIGTERM, how long to wait for the running job to hand itself back to the queue.
    shutdown_grace_seconds: float = 60.0

    # --- Limits and security (issue #9). 0 disables a rate limit or quota. ---
    # Hugging Face ids a job may name ("org/name" or "org/*"); empty: no hub model is allowed.
    allowed_hub_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Networks (CIDR) a webhook may reach although they are not global (e.g. "10.0.0.0/8,127.0.0.1/32").
    webhook_allowed_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Bearer token for a scrape of every tenant's /metrics; without it /metrics needs an API key
    # and shows only that key's tenant.
    metrics_token: str | None = None
    # Token buckets (requests per second, burst) per client address and per API key; the load
    # benchmark sets the rates to 0 (off) because it drives one address with one key.
    rate_limit_per_address: float = 100.0
    rate_limit_per_address_burst: int = 400
    rate_limit_per_key: float = 100.0
    rate_limit_per_key_burst: int = 400
    # Failed authentications (401) an address may make per minute before it is answered 429.
    auth_failures_per_minute: float = 30.0
    auth_failures_burst: int = 30
    # Per-tenant quotas: queued + running jobs (429 when reached) and stored bytes of datasets and
    # artifacts (507 when reached).
    max_active_jobs_per_tenant: int = 100
    max_stored_bytes_per_tenant: int = 200 * 2**30
    # A dry run reads only config.json; this bounds how long that may take inside a request.
    dry_run_timeout_seconds: float = 5.0

    @field_validator("allowed_model_roots", mode="before")
    @classmethod
    def _parse_roots(cls, value: object) -> object:
        return _split_paths(value)

    @field_validator("allowed_hub_models", "webhook_allowed_networks", mode="before")
    @classmethod
    def _parse_list(cls, value: object) -> object:
        # Comma-separated in the environment (hub ids contain "/" and networks contain ":").
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for item in value:  # a typo fails at start, not as an error on the first webhook
            ipaddress.ip_network(item, strict=False)
        return value

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
        """Create the data directory tree, private to the service's user (dirs 0700, files 0600)."""
        from app.security import private_dir, restrict_umask

        restrict_umask()
        dirs = [self.data_dir, self.models_dir, self.datasets_dir, self.artifacts_dir, self.tmp_dir]
        if self.embedded_broker:
            dirs += [self.broker_dir, *(self.broker_dir / name for name in ("queue", "processed", "control"))]
        for path in dirs:
            private_dir(path)
        if self.resolved_database_url.startswith("sqlite:///"):
            from app.security import private_file

            db = Path(self.resolved_database_url.removeprefix("sqlite:///"))
            for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                private_file(path)


def get_settings() -> Settings:
    return Settings()
