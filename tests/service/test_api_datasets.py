"""Calibration uploads: accepted formats, sha256, limits, and refusals that store nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.service.conftest import KEY_B, Api, tiny_job
from tests.service.test_api_jobs import assert_problem


def upload(api: Api, filename: str, content: bytes, key: str | None = None, **form: str):  # type: ignore[no-untyped-def]
    kwargs = {"key": key} if key else {}
    return api.post("/v1/datasets", files={"file": (filename, content)}, data=form, **kwargs)


def stored_files(api: Api) -> list[Path]:
    return sorted(p for p in api.settings.datasets_dir.rglob("*") if p.is_file())


def test_txt_and_jsonl_uploads_record_sha256_and_counts(api: Api) -> None:
    text = ("The quick brown fox jumps over the lazy dog. " * 50).encode()
    response = upload(api, "calib.txt", text)
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["sha256"] == hashlib.sha256(text).hexdigest()
    assert dataset["format"] == "txt" and dataset["size_bytes"] == len(text) and dataset["n_texts"] == 1

    lines = b"\n".join(json.dumps({"text": f"sample {i} " * 10}).encode() for i in range(3))
    jsonl = upload(api, "calib.jsonl", lines, name="three samples").json()
    assert jsonl["format"] == "jsonl" and jsonl["n_texts"] == 3 and jsonl["name"] == "three samples"
    assert {d["id"] for d in api.get("/v1/datasets").json()} == {dataset["id"], jsonl["id"]}
    assert api.get(f"/v1/datasets/{dataset['id']}").json()["sha256"] == dataset["sha256"]


@pytest.mark.parametrize(
    ("name", "content", "status", "code"),
    [
        ("empty.txt", b"", 422, "empty_upload"),
        ("blank.txt", b"   \n\n ", 422, "empty_upload"),
        ("binary.txt", bytes(range(256)) * 4, 422, "binary_upload"),
        ("latin1.txt", "caf\xe9".encode("latin-1") * 10, 422, "binary_upload"),
        ("weights.bin", b"hello", 415, "unsupported_format"),
        ("bad.jsonl", b'{"text": "ok"}\n{not json}\n', 422, "invalid_jsonl"),
        ("notext.jsonl", b'{"content": "no text field"}\n', 422, "invalid_jsonl"),
        ("huge.txt", b"a" * (300 * 1024), 413, "upload_too_large"),
    ],
)
def test_bad_uploads_are_refused_and_leave_stored_data_intact(
    api: Api, name: str, content: bytes, status: int, code: str
) -> None:
    good = upload(api, "good.txt", b"some calibration text " * 20).json()
    files_before = stored_files(api)
    assert_problem(upload(api, name, content), status, code)
    assert [d["id"] for d in api.get("/v1/datasets").json()] == [good["id"]]
    assert stored_files(api) == files_before
    assert not any(api.settings.tmp_dir.iterdir())  # no partial upload left behind


def test_body_far_over_the_limit_is_refused_before_it_is_read(api: Api) -> None:
    response = api.post(
        "/v1/datasets", content=b"x" * (2 * 1024 * 1024), headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert_problem(response, 413, "upload_too_large")


def test_datasets_are_per_tenant(api: Api, model_root: Path) -> None:
    dataset = upload(api, "mine.txt", b"private calibration text " * 20).json()
    assert_problem(api.get(f"/v1/datasets/{dataset['id']}", key=KEY_B), 404, "dataset_not_found")
    assert api.get("/v1/datasets", key=KEY_B).json() == []
    body = tiny_job(model_root, calibration={"source": "dataset", "dataset_id": dataset["id"]})
    assert_problem(api.post("/v1/jobs", json=body, key=KEY_B), 404, "dataset_not_found")
    assert api.post("/v1/jobs", json=body).status_code == 202


def test_compensation_budget_follows_the_calibration_source(api: Api, model_root: Path) -> None:
    """Dataset windows are free, so compensation gets the larger default; self-generated ones keep the
    smaller one; a budget the user sets is kept either way."""
    dataset = upload(api, "calib.txt", ("Pruning keeps what matters. " * 200).encode()).json()
    by_dataset = {"source": "dataset", "dataset_id": dataset["id"], "n_samples": 2, "seq_len": 16}

    def budget(**overrides: object) -> int:
        job = tiny_job(model_root, method="shortgpt", options={"compensation": True}, **overrides)
        response = api.post("/v1/jobs", params={"dry_run": "true"}, json=job)
        assert response.status_code == 200, response.text
        return response.json()["spec"]["options"]["compensation_samples"]

    assert budget(calibration=by_dataset) == 128
    assert budget() == 32  # tiny_job calibrates on self-generated text
    explicit = tiny_job(
        model_root, method="shortgpt", options={"compensation": True, "compensation_samples": 8}, calibration=by_dataset
    )
    spec = api.post("/v1/jobs", params={"dry_run": "true"}, json=explicit).json()["spec"]
    assert spec["options"]["compensation_samples"] == 8
