"""Job API behaviour on SQLite and PostgreSQL: contract, validation, tenancy, idempotency, paging, cancel."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.conftest import KEY_B, Api, tiny_job


def job_count(api: Api, key: str | None = None) -> int:
    kwargs = {"key": key} if key else {}
    return len(api.get("/v1/jobs", params={"limit": 200}, **kwargs).json()["items"])


def assert_problem(response, status: int, code: str) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code
    assert body["status"] == status
    assert body["detail"]  # a sentence a person can act on
    return body


def test_requests_need_a_valid_key(api: Api) -> None:
    assert_problem(api.client.get("/v1/jobs"), 401, "unauthorized")
    assert_problem(api.get("/v1/jobs", key="sf_wrong"), 401, "unauthorized")
    assert api.get("/v1/jobs").status_code == 200


def test_submit_returns_202_with_location_and_the_contract_fields(api: Api, model_root: Path) -> None:
    response = api.post("/v1/jobs", json=tiny_job(model_root))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0 and job["error"] is None
    assert job["artifact_id"] is None
    assert job["options"]["compensation"] is False  # method defaults are resolved and stored
    fetched = api.get(f"/v1/jobs/{job['id']}").json()
    assert fetched["id"] == job["id"] and fetched["status"] == "queued"
    assert fetched["created_at"].endswith("Z") or fetched["created_at"].endswith("+00:00")


def test_contract_example_body_is_accepted(api: Api) -> None:
    body = {
        "model": "builtin:smollm2-135m",
        "method": "gradmap",
        "target_sparsity": 0.2,
        "sparsity_basis": "layers",
        "calibration": {"source": "self_generated", "n_samples": 8, "seq_len": 128},
    }
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["method"] == "gradmap"


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"model": "builtin:no-such-model"}, 422, "unknown_model"),
        ({"model": "not a model id"}, 422, "unknown_model"),
        ({"target_sparsity": 0}, 422, "validation_error"),
        ({"target_sparsity": 1}, 422, "validation_error"),
        ({"target_sparsity": -0.2}, 422, "validation_error"),
        ({"target_sparsity": "lots"}, 422, "validation_error"),
        ({"method": "magic"}, 422, "unknown_method"),
        ({"options": {"no_such_option": 1}}, 422, "invalid_options"),
        ({"sparsity_basis": "bytes"}, 422, "validation_error"),
        ({"calibration": {"source": "dataset", "dataset_id": "ds_missing"}}, 404, "dataset_not_found"),
        ({"calibration": {"source": "self_generated", "n_samples": 0}}, 422, "validation_error"),
        ({"model": "/etc"}, 403, "path_not_allowed"),
        ({"model": "/tmp/../etc/passwd"}, 403, "path_not_allowed"),
        ({"unexpected_field": True}, 422, "validation_error"),
    ],
)
def test_bad_job_requests_are_refused_and_store_nothing(
    api: Api, model_root: Path, change: dict, status: int, code: str
) -> None:
    api.post("/v1/jobs", json=tiny_job(model_root))
    before = job_count(api)
    assert_problem(api.post("/v1/jobs", json=tiny_job(model_root, **change)), status, code)
    assert job_count(api) == before


def test_malformed_json_is_a_400_problem(api: Api) -> None:
    response = api.post(
        "/v1/jobs", content=b'{"model": "builtin:smollm2-135m",', headers={"content-type": "application/json"}
    )
    body = assert_problem(response, 400, "malformed_json")
    assert "JSON" in body["detail"]
    assert job_count(api) == 0


def test_local_model_inside_allowed_root_is_accepted(api: Api, model_root: Path) -> None:
    assert api.post("/v1/jobs", json=tiny_job(model_root)).status_code == 202


def test_another_tenants_job_is_invisible(api: Api, model_root: Path) -> None:
    job = api.post("/v1/jobs", json=tiny_job(model_root)).json()
    assert_problem(api.get(f"/v1/jobs/{job['id']}", key=KEY_B), 404, "job_not_found")
    assert_problem(api.post(f"/v1/jobs/{job['id']}/cancel", key=KEY_B), 404, "job_not_found")
    assert_problem(api.get(f"/v1/jobs/{job['id']}/events", key=KEY_B), 404, "job_not_found")
    assert job_count(api, key=KEY_B) == 0
    # ... and the owner's job is untouched by those attempts.
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"


def test_idempotency_key_returns_the_same_job_or_a_conflict(api: Api, model_root: Path) -> None:
    headers = {"Idempotency-Key": "abc-123"}
    first = api.post("/v1/jobs", json=tiny_job(model_root), headers=headers)
    again = api.post("/v1/jobs", json=tiny_job(model_root), headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = api.post("/v1/jobs", json=tiny_job(model_root, target_sparsity=0.5), headers=headers)
    assert_problem(other, 409, "idempotency_conflict")
    assert job_count(api) == 1
    # The same key is independent per tenant.
    assert api.post("/v1/jobs", json=tiny_job(model_root), headers=headers, key=KEY_B).status_code == 202


def test_listing_pages_with_a_cursor_and_filters_by_status(api: Api, model_root: Path) -> None:
    ids = [api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"] for _ in range(5)]
    api.post(f"/v1/jobs/{ids[0]}/cancel")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5  # no job skipped or repeated
    assert seen == list(reversed(ids))  # newest first
    cancelled = api.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert_problem(api.get("/v1/jobs", params={"status": "exploded"}), 422, "invalid_status")
    assert_problem(api.get("/v1/jobs", params={"cursor": "garbage"}), 400, "invalid_cursor")


def test_cancel_is_idempotent_and_retry_requeues(api: Api, model_root: Path) -> None:
    job = api.post("/v1/jobs", json=tiny_job(model_root)).json()
    first = api.post(f"/v1/jobs/{job['id']}/cancel").json()
    second = api.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert first["status"] == second["status"] == "cancelled"
    events = api.get(f"/v1/jobs/{job['id']}/events").json()
    assert [e["data"]["status"] for e in events if e["kind"] == "status"] == ["queued", "cancelled"]
    assert [e["seq"] for e in events] == [1, 2]
    assert api.get(f"/v1/jobs/{job['id']}/events", params={"after": 1}).json()[0]["seq"] == 2
    retried = api.post(f"/v1/jobs/{job['id']}/retry")
    assert retried.status_code == 202 and retried.json()["status"] == "queued"
    assert_problem(api.post(f"/v1/jobs/{job['id']}/retry"), 409, "not_retryable")


def test_dry_run_returns_a_plan_and_queues_nothing(api: Api, model_root: Path) -> None:
    response = api.post("/v1/jobs", params={"dry_run": "true"}, json=tiny_job(model_root))
    assert response.status_code == 200, response.text
    plan = response.json()["plan"]
    assert plan["removed_layers"] == [4, 5]  # last_k removes the last round(0.34 * 6) = 2 layers
    assert job_count(api) == 0


def test_catalog_health_and_metrics(api: Api, model_root: Path) -> None:
    models = api.get("/v1/models").json()
    assert "builtin:smollm2-135m" in [m["id"] for m in models["models"]]
    assert str(model_root) in models["local_roots"]
    methods = {m["name"] for m in api.get("/v1/methods").json()["methods"]}
    assert {"gradmap", "shortgpt", "last_k"} <= methods
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json()["database"] == "ok"
    api.post("/v1/jobs", json=tiny_job(model_root))
    metrics = api.get("/metrics").text
    assert 'slimforge_jobs{status="queued"} 1.0' in metrics
    # Without the operator's metrics token a scrape needs a key and sees only its own tenant.
    assert_problem(api.client.get("/metrics"), 401, "unauthorized")
    assert 'slimforge_jobs{status="queued"} 0.0' in api.get("/metrics", key=KEY_B).text
    api.settings.metrics_token = "scrape-token"
    everyone = api.client.get("/metrics", headers={"Authorization": "Bearer scrape-token"}).text
    assert 'slimforge_jobs{status="queued"} 1.0' in everyone


def test_metrics_read_stage_timings_of_succeeded_jobs_only(api: Api, model_root: Path) -> None:
    """/metrics reads each result's `timings` in SQL; a failed job's partial timings do not count."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.db import session_scope
    from app.models import Job, utcnow

    done, failed = (api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"] for _ in range(2))
    now = utcnow()
    report = {"curve": [{"k": k, "loss": 1.0} for k in range(2000)]}  # a large result beside the timings
    with session_scope(api.client.app.state.services.sessions) as session:
        for job_id, status, timings in (
            (done, "succeeded", {"scoring": 2.5, "note": "x"}),
            (failed, "failed", {"scoring": 9.0}),
        ):
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    status=status,
                    started_at=now - timedelta(seconds=3),
                    finished_at=now,
                    result={"timings": timings, "report": report},
                )
            )
    metrics = api.get("/metrics").text
    assert 'slimforge_job_stage_seconds_count{method="last_k",stage="scoring"} 1.0' in metrics
    assert 'slimforge_job_stage_seconds_sum{method="last_k",stage="scoring"} 2.5' in metrics
    assert 'stage="note"' not in metrics
    assert 'slimforge_job_duration_seconds_count{method="last_k",status="failed"} 1.0' in metrics
