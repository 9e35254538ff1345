"""Service fixtures: real SQLite and PostgreSQL stores, the API app, tiny local models."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.tiny_models import make_tiny_llama_dir

PG_ADMIN_URL = os.environ.get("SLIMFORGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SLIMFORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY_A = "sf_test_key_tenant_a"
KEY_B = "sf_test_key_tenant_b"


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """Create an empty PostgreSQL database for one test and drop it afterwards."""
    import psycopg

    name = f"slimforge_test_{uuid.uuid4().hex[:12]}"
    admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed model root holding `tiny-llama`, a random 6-layer LLaMA with a real tokenizer."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_llama_dir(root / "tiny-llama")
    return root


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        with fresh_pg_database() as url:
            yield url


def make_settings(data_dir: Path, database_url: str, model_root: Path, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        data_dir=data_dir,
        database_url=database_url,
        bootstrap_key=KEY_A,
        allowed_model_roots=[model_root],
        max_upload_bytes=256 * 1024,
        heartbeat_seconds=1.0,
        reaper_interval_seconds=1.0,
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def redis_settings(data_dir: Path, database_url: str, model_root: Path, **overrides: object) -> Settings:
    """Production-mode settings: the machine's Redis as broker, on a queue of the test's own."""
    values: dict[str, object] = dict(broker_url=REDIS_URL, queue_name=f"test-{uuid.uuid4().hex[:8]}")
    return make_settings(data_dir, database_url, model_root, **{**values, **overrides})


def prepare_store(settings: Settings) -> None:
    """Migrate to head and register the two test tenants' keys."""
    from app.auth import bootstrap_keys, create_key
    from app.db import make_engine, make_session_factory, session_scope
    from app.migrate import upgrade

    settings.ensure_dirs()
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        bootstrap_keys(session, settings.bootstrap_key)
        create_key(session, "tenant-b", name="second tenant", key=KEY_B)
    engine.dispose()


@dataclass
class Api:
    client: TestClient
    settings: Settings

    def headers(self, key: str = KEY_A) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def get(self, path: str, key: str = KEY_A, **kw: object):  # type: ignore[no-untyped-def]
        return self.client.get(path, headers=self.headers(key), **kw)

    def post(self, path: str, key: str = KEY_A, **kw: object):  # type: ignore[no-untyped-def]
        headers = {**self.headers(key), **kw.pop("headers", {})}  # type: ignore[dict-item]
        return self.client.post(path, headers=headers, **kw)


@contextmanager
def serving(settings: Settings) -> Iterator[Api]:
    """The API app on a freshly prepared store for these settings (in-process, no worker)."""
    from app.main import create_app

    prepare_store(settings)
    app = create_app(settings)
    with TestClient(app) as client:
        yield Api(client, settings)
    app.state.services.engine.dispose()


@pytest.fixture
def api(database_url: str, tmp_path: Path, model_root: Path) -> Iterator[Api]:
    """The API app on a fresh store (SQLite and PostgreSQL); no worker consumes its queue."""
    with serving(make_settings(tmp_path / "data", database_url, model_root)) as api:
        yield api


def tiny_job(model_root: Path, **overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "model": str(model_root / "tiny-llama"),
        "method": "last_k",
        "target_sparsity": 0.34,
        "sparsity_basis": "layers",
        "calibration": {"source": "self_generated", "n_samples": 2, "seq_len": 16},
    }
    body.update(overrides)
    return body


@pytest.fixture
def live_server(database_url: str, tmp_path: Path, model_root: Path) -> Iterator[tuple[str, Api]]:
    """The app under a real uvicorn (threadpool and all) on a free loopback port, as `slimforge serve` runs it."""
    from app.cli import server_options
    from app.main import create_app

    settings = make_settings(tmp_path / "data", database_url, model_root)
    prepare_store(settings)
    app = create_app(settings)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **server_options("127.0.0.1", port, "warning", False)))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    with TestClient(app) as client:
        yield f"http://127.0.0.1:{port}", Api(client, settings)
    server.should_exit = True
    thread.join(timeout=30)
    app.state.services.engine.dispose()
