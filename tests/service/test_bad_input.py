"""Bad input answers a clear 4xx problem (never a 5xx) and leaves nothing behind, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.errors import ApiError
from app.inputs import DB_INT_MAX, parse_last_event_id
from tests.service.conftest import Api, tiny_job
from tests.service.test_api_datasets import stored_files, upload
from tests.service.test_api_jobs import assert_problem, job_count


def leftover_files(api: Api) -> list[Path]:
    """Files under the data dir that a failed request could have orphaned (uploads and their temps)."""
    return stored_files(api) + sorted(p for p in api.settings.tmp_dir.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/job_%00",
        "/v1/jobs/%01abc/events",
        "/v1/datasets/ds%00",
        "/v1/artifacts/art%00/archive",
        "/v1/artifacts/art_x/files/a%00b",
        "/v1/jobs?model=a%00b",
        "/v1/jobs?method=%1b",
        "/v1/jobs?status=queued%00",
        "/v1/jobs?cursor=%00",
    ],
)
def test_control_characters_in_paths_and_queries_are_400(api: Api, path: str) -> None:
    body = assert_problem(api.get(path), 400, "invalid_characters")
    assert "U+00" in body["detail"]


@pytest.mark.parametrize(
    "change",
    [
        {"model": "builtin:smollm2-135m\u0000"},
        {"model": "org/na\u0000me"},
        {"method": "last_k\u0007"},
        {"options": {"k\u0000": 1}},
        {"options": {"selection": "a\u0000"}},
        {"calibration": {"source": "dataset", "dataset_id": "ds_\u0000"}},
    ],
)
def test_control_characters_in_json_strings_are_422_and_store_nothing(api: Api, model_root: Path, change: dict) -> None:
    body = assert_problem(api.post("/v1/jobs", json=tiny_job(model_root, **change)), 422, "validation_error")
    assert "control character" in body["detail"]
    assert job_count(api) == 0


def test_control_characters_in_headers_and_upload_names_are_400_and_store_nothing(api: Api, model_root: Path) -> None:
    headers = {"Idempotency-Key": "key\twith-tab"}
    assert_problem(api.post("/v1/jobs", json=tiny_job(model_root), headers=headers), 400, "invalid_characters")
    assert job_count(api) == 0
    text = b"calibration text " * 20
    # httpx would percent-encode a NUL in the file name; send the multipart body as a raw client can.
    raw = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="calib\x00.txt"\r\n\r\n'
        + text
        + b"\r\n--b--\r\n"
    )
    response = api.post("/v1/datasets", content=raw, headers={"content-type": "multipart/form-data; boundary=b"})
    assert_problem(response, 400, "invalid_characters")
    assert_problem(upload(api, "calib.txt", text, name="bad\u0000name"), 400, "invalid_characters")
    assert api.get("/v1/datasets").json() == []
    assert leftover_files(api) == []


@pytest.mark.parametrize("after", ["2147483648", "99999999999999999999", "-1"])
def test_event_cursor_is_bounded_to_the_database_integer(api: Api, model_root: Path, after: str) -> None:
    job = api.post("/v1/jobs", json=tiny_job(model_root)).json()
    for route in ("events", "events/stream"):
        assert_problem(api.get(f"/v1/jobs/{job['id']}/{route}", params={"after": after}), 422, "validation_error")
    assert api.get(f"/v1/jobs/{job['id']}/events", params={"after": DB_INT_MAX}).json() == []


def test_malformed_last_event_id_is_400(api: Api, model_root: Path) -> None:
    job = api.post("/v1/jobs", json=tiny_job(model_root)).json()
    for value in ("abc", "-1", "1.5", str(DB_INT_MAX + 1)):
        response = api.client.get(
            f"/v1/jobs/{job['id']}/events/stream", headers={**api.headers(), "Last-Event-ID": value}
        )
        assert_problem(response, 400, "invalid_last_event_id")


def test_parse_last_event_id() -> None:
    assert parse_last_event_id(None, 7) == 7
    assert parse_last_event_id("  ", 7) == 7
    assert parse_last_event_id("12", 7) == 12
    assert parse_last_event_id(str(DB_INT_MAX), 0) == DB_INT_MAX
    for bad in ("abc", "-3", "١٢", "1e3", str(DB_INT_MAX + 1)):
        with pytest.raises(ApiError) as caught:
            parse_last_event_id(bad, 0)
        assert caught.value.status == 400 and caught.value.code == "invalid_last_event_id"


def test_deeply_nested_jsonl_is_422_and_stores_nothing(api: Api) -> None:
    line = b"[" * 200_000  # 200,000 levels deep (the limit of 256 KiB leaves no room for the closers)
    body = assert_problem(upload(api, "deep.jsonl", line), 422, "invalid_jsonl")
    assert "nested too deeply" in body["detail"]
    assert leftover_files(api) == []


def test_chunked_body_over_the_limit_is_413(api: Api) -> None:
    limit = api.settings.max_upload_bytes

    def chunks():  # no Content-Length: the body size is only known while it streams
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n'
        for _ in range(limit // 65536 + 4):
            yield b"x" * 65536

    response = api.post("/v1/datasets", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert_problem(response, 413, "upload_too_large")
    assert leftover_files(api) == []


def test_storage_quota_refuses_an_upload_and_removes_its_file(api: Api) -> None:
    api.settings.max_stored_bytes_per_tenant = 100
    assert_problem(upload(api, "calib.txt", b"calibration text " * 20), 507, "storage_quota_exceeded")
    assert api.get("/v1/datasets").json() == []
    assert leftover_files(api) == []


def test_concurrent_submissions_with_one_idempotency_key_resolve_to_one_job(api: Api, model_root: Path) -> None:
    body = tiny_job(model_root)

    def submit(_: int):  # type: ignore[no-untyped-def]
        return api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "race-1"})

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(submit, range(10)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 9 + [202], [r.text for r in responses if r.status_code >= 300]
    assert len({r.json()["id"] for r in responses}) == 1
    assert job_count(api) == 1


def broken_model(root: Path, name: str, config: str | None) -> str:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(config)
    return str(path)


@pytest.mark.parametrize(
    "config",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"hidden_size": 64}),
        json.dumps({"model_type": "no-such-architecture"}),
        json.dumps({"model_type": "llama", "num_hidden_layers": "six"}),
        json.dumps({"model_type": "llama", "hidden_size": -5, "num_attention_heads": 0}),
        "[" * 100_000,
    ],
)
def test_dry_run_on_a_broken_config_is_422(api: Api, model_root: Path, tmp_path: Path, config: str) -> None:
    root = tmp_path / "broken-models"
    api.settings.allowed_model_roots = [*api.settings.allowed_model_roots, root]
    model = broken_model(root, "m", config)
    response = api.post("/v1/jobs", params={"dry_run": "true"}, json=tiny_job(model_root, model=model))
    assert_problem(response, 422, "invalid_model_config")
    assert job_count(api) == 0


def test_dry_run_of_a_builtin_reads_a_config_without_dequantising(api: Api, model_root: Path) -> None:
    started = time.monotonic()
    body = tiny_job(model_root, model="builtin:smollm2-135m", method="last_k", target_sparsity=0.2)
    response = api.post("/v1/jobs", params={"dry_run": "true"}, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["plan"]["layers_before"] == 30
    assert time.monotonic() - started < 10
    assert not (api.settings.models_dir / "smollm2-135m").exists()  # nothing dequantised or cached


def test_hub_ids_need_the_allow_list_and_dry_runs_never_download(api: Api, model_root: Path) -> None:
    body = tiny_job(model_root, model="some-org/some-model")
    body_text = assert_problem(api.post("/v1/jobs", json=body), 403, "hub_model_not_allowed")["detail"]
    assert "SLIMFORGE_ALLOWED_HUB_MODELS" in body_text
    assert_problem(api.post("/v1/jobs", params={"dry_run": "true"}, json=body), 403, "hub_model_not_allowed")
    api.settings.allowed_hub_models = ["some-org/*"]
    started = time.monotonic()
    response = api.post("/v1/jobs", params={"dry_run": "true"}, json=body)
    assert_problem(response, 422, "config_not_cached")
    assert time.monotonic() - started < 5
    assert api.post("/v1/jobs", json=body).status_code == 202
    assert_problem(api.post("/v1/jobs", json=tiny_job(model_root, model="other-org/x")), 403, "hub_model_not_allowed")


def test_dry_run_is_bounded_in_time(api: Api, model_root: Path) -> None:
    # Planning the 30-layer built-in takes a good fraction of a second; a zero budget cannot fit it.
    api.settings.dry_run_timeout_seconds = 0.0
    body = tiny_job(model_root, model="builtin:smollm2-135m", method="gradmap", target_sparsity=0.3)
    response = api.post("/v1/jobs", params={"dry_run": "true"}, json=body)
    assert_problem(response, 422, "dry_run_timeout")


def test_a_model_directory_without_config_is_still_422(api: Api, model_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "empty-models"
    api.settings.allowed_model_roots = [*api.settings.allowed_model_roots, root]
    model = broken_model(root, "empty", None)
    assert_problem(
        api.post("/v1/jobs", params={"dry_run": "true"}, json=tiny_job(model_root, model=model)), 422, "unknown_model"
    )
    shutil.rmtree(root)


def test_deeply_nested_or_non_finite_json_bodies_are_4xx(api: Api, model_root: Path) -> None:
    deep = b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    headers = {"content-type": "application/json"}
    assert_problem(api.post("/v1/jobs", content=deep, headers=headers), 400, "malformed_json")
    # NaN/Infinity are not JSON, though Python parses them; PostgreSQL's JSON column would refuse them.
    body = json.dumps(tiny_job(model_root, method="gradmap", options={"compensation_ridge": float("inf")}))
    detail = assert_problem(api.post("/v1/jobs", content=body, headers=headers), 422, "validation_error")["detail"]
    assert "finite" in detail
    assert job_count(api) == 0


def test_a_home_directory_of_an_unknown_user_is_422(api: Api, model_root: Path) -> None:
    # Path.expanduser raises RuntimeError for "~<user>" when no such user exists (found by schemathesis).
    for dry_run in ("true", "false"):
        response = api.post("/v1/jobs", params={"dry_run": dry_run}, json=tiny_job(model_root, model="~no-such-user-x"))
        assert_problem(response, 422, "unknown_model")
