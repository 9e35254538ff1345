"""Security of the service: private files, webhook targets, scoped metrics, tenant names, rate limits, quotas."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.netguard import WebhookTargetRefused, address_allowed, check_url_literal, parse_networks, resolve_checked
from app.tenants import InvalidTenant, validate_tenant_id
from tests.service.conftest import KEY_A, KEY_B, Api, tiny_job
from tests.service.test_api_datasets import upload
from tests.service.test_api_jobs import assert_problem


@contextmanager
def app_with(api: Api, **overrides: object) -> Iterator[Api]:
    """A second app on the same store with changed settings (middleware reads them at start)."""
    from app.main import create_app
    from app.settings import Settings

    # Built anew, not model_copy: the copy would keep cached derived values (the database URL).
    settings = Settings(**{**api.settings.model_dump(), **overrides})
    app = create_app(settings)
    with TestClient(app) as client:
        yield Api(client, settings)
    app.state.services.engine.dispose()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_directory_and_files_are_private(api: Api) -> None:
    assert upload(api, "calib.txt", b"calibration text " * 20).status_code == 201
    assert mode(api.settings.data_dir) == 0o700
    for sub in (api.settings.datasets_dir, api.settings.artifacts_dir, api.settings.tmp_dir):
        assert mode(sub) == 0o700
    files = [p for p in api.settings.data_dir.rglob("*") if p.is_file()]
    assert files and all(mode(p) & 0o077 == 0 for p in files), {str(p): oct(mode(p)) for p in files}
    if api.settings.resolved_database_url.startswith("sqlite"):
        db = Path(api.settings.resolved_database_url.removeprefix("sqlite:///"))
        assert mode(db) & 0o077 == 0


def test_an_existing_world_readable_store_is_tightened(tmp_path: Path) -> None:
    from app.settings import Settings

    data = tmp_path / "old"
    data.mkdir(mode=0o755)
    (data / "slimforge.db").write_bytes(b"")
    (data / "slimforge.db").chmod(0o644)
    Settings(data_dir=data).ensure_dirs()
    assert mode(data) == 0o700 and mode(data / "slimforge.db") == 0o600


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://100.64.0.1/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[fe80::1]/hook",
        "http://0.0.0.0/hook",
        "http://localhost:9000/hook",
        "http://api.localhost/hook",
    ],
)
def test_webhooks_to_non_global_addresses_are_refused_at_submit(api: Api, model_root: Path, url: str) -> None:
    api.settings.webhook_secret = "s3cret"
    body = assert_problem(
        api.post("/v1/jobs", json=tiny_job(model_root, webhook_url=url)), 422, "webhook_url_not_allowed"
    )
    assert "SLIMFORGE_WEBHOOK_ALLOWED_NETWORKS" in body["detail"]


def test_webhook_address_rules() -> None:
    none: list = []
    assert address_allowed(ipaddress.ip_address("93.184.216.34"), none)
    assert not address_allowed(ipaddress.ip_address("224.0.0.1"), none)  # multicast
    assert address_allowed(ipaddress.ip_address("10.0.0.5"), parse_networks(["10.0.0.0/8"]))
    check_url_literal("https://hooks.example.com/x", none)  # names wait for the send-time check
    check_url_literal("http://127.0.0.1/x", parse_networks(["127.0.0.1/32"]))
    # At send time the name is resolved and every address checked.
    with pytest.raises(WebhookTargetRefused):
        resolve_checked("http://localhost:1/hook", none)
    assert resolve_checked("http://localhost:1/hook", parse_networks(["127.0.0.0/8", "::1/128"]))


def test_readyz_gives_no_internal_error_text(api: Api) -> None:
    broken = "postgresql+psycopg://secret_user:pw@127.0.0.1:1/nowhere"
    with app_with(api, database_url=broken) as other:
        body = assert_problem(other.client.get("/readyz"), 503, "not_ready")
    assert "secret_user" not in body["detail"] and "127.0.0.1" not in body["detail"]


def test_tenant_names_are_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for good in ("default", "tenant-b", "team_a1", "x"):
        assert validate_tenant_id(good) == good
    for bad in ("../../x", "a/b", "", "-a", "A", "a.b", "x" * 65, "a\u0000"):
        with pytest.raises(InvalidTenant):
            validate_tenant_id(bad)
    from app.cli import main

    monkeypatch.setenv("SLIMFORGE_DATA_DIR", str(tmp_path / "data"))
    assert main(["create-key", "--tenant", "../../x"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "data").exists()


def test_requests_over_the_per_address_rate_get_429_with_retry_after(api: Api) -> None:
    with app_with(api, rate_limit_per_address=0.01, rate_limit_per_address_burst=3) as limited:
        assert [limited.get("/v1/jobs").status_code for _ in range(3)] == [200, 200, 200]
        response = limited.get("/v1/jobs")
        assert_problem(response, 429, "rate_limited")
        assert int(response.headers["retry-after"]) >= 1
        assert limited.client.get("/healthz").status_code == 200  # probes are never throttled


def test_requests_over_the_per_key_rate_get_429(api: Api) -> None:
    with app_with(api, rate_limit_per_address=0, rate_limit_per_key=0.01, rate_limit_per_key_burst=2) as limited:
        assert [limited.get("/v1/jobs").status_code for _ in range(2)] == [200, 200]
        assert_problem(limited.get("/v1/jobs"), 429, "rate_limited")
        assert limited.get("/v1/jobs", key=KEY_B).status_code == 200  # another key has its own bucket


def test_failed_authentications_are_limited_more_strictly(api: Api) -> None:
    with app_with(api, auth_failures_per_minute=1, auth_failures_burst=5) as limited:
        statuses = [limited.get("/v1/jobs", key=f"sf_guess_{i}").status_code for i in range(8)]
        assert statuses == [401] * 5 + [429] * 3
        response = limited.get("/v1/jobs", key=KEY_A)  # the address is blocked until the budget refills
        assert_problem(response, 429, "rate_limited")
        assert int(response.headers["retry-after"]) >= 30


def test_default_limits_let_a_dashboard_through(api: Api, model_root: Path) -> None:
    job = api.post("/v1/jobs", json=tiny_job(model_root)).json()
    assert all(api.get(f"/v1/jobs/{job['id']}").status_code == 200 for _ in range(150))


def test_active_job_quota_is_429_per_tenant(api: Api, model_root: Path) -> None:
    api.settings.max_active_jobs_per_tenant = 2
    assert [api.post("/v1/jobs", json=tiny_job(model_root)).status_code for _ in range(2)] == [202, 202]
    body = assert_problem(api.post("/v1/jobs", json=tiny_job(model_root)), 429, "job_quota_exceeded")
    assert "limit 2" in body["detail"]
    assert api.post("/v1/jobs", json=tiny_job(model_root), key=KEY_B).status_code == 202
    replay = api.post("/v1/jobs", json=tiny_job(model_root), headers={"Idempotency-Key": "k1"})
    assert replay.status_code == 429  # a new job, so the quota applies
    api.settings.max_active_jobs_per_tenant = 3
    assert api.post("/v1/jobs", json=tiny_job(model_root), headers={"Idempotency-Key": "k1"}).status_code == 202
    api.settings.max_active_jobs_per_tenant = 2
    # A replay of an existing job is no new job: it still answers 200 at the quota.
    assert api.post("/v1/jobs", json=tiny_job(model_root), headers={"Idempotency-Key": "k1"}).status_code == 200
    api.settings.max_active_jobs_per_tenant = 3
    job_id = api.get("/v1/jobs").json()["items"][0]["id"]
    api.post(f"/v1/jobs/{job_id}/cancel")
    assert api.post("/v1/jobs", json=tiny_job(model_root)).status_code == 202


def test_storage_quota_blocks_new_jobs_with_507(api: Api, model_root: Path) -> None:
    assert upload(api, "calib.txt", b"calibration text " * 20).status_code == 201
    api.settings.max_stored_bytes_per_tenant = 100
    assert_problem(api.post("/v1/jobs", json=tiny_job(model_root)), 507, "storage_quota_exceeded")
    assert api.post("/v1/jobs", json=tiny_job(model_root), key=KEY_B).status_code == 202
