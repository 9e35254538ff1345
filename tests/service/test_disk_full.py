"""A full disk answers 507 `insufficient_storage`, stores nothing partial and recovers once space is back.

The data directory lives on a real, tiny tmpfs (needs root to mount; skipped with the reason otherwise).
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import Api, make_settings, prepare_store, tiny_job
from tests.service.test_api_jobs import assert_problem


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the disk-full tests (needs root): {result.stderr.strip()}")


def fill(disk: Path) -> Path:
    """Write one file until the filesystem refuses the next byte."""
    filler = disk / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.fixture
def disk_api(database_url: str, tmp_path: Path, model_root: Path) -> Iterator[tuple[Api, Path]]:
    from app.main import create_app

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "16m")
    try:
        settings = make_settings(disk / "data", database_url, model_root)
        prepare_store(settings)
        app = create_app(settings)
        with TestClient(app) as client:
            yield Api(client, settings), disk
        app.state.services.engine.dispose()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def data_files(api: Api) -> list[Path]:
    roots = (api.settings.datasets_dir, api.settings.tmp_dir, api.settings.artifacts_dir)
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file())


def test_upload_on_a_full_disk_is_507_and_leaves_no_file(disk_api: tuple[Api, Path]) -> None:
    api, disk = disk_api
    filler = fill(disk)
    response = api.post("/v1/datasets", files={"file": ("calib.txt", b"calibration text " * 4000)})
    assert_problem(response, 507, "insufficient_storage")
    assert data_files(api) == []
    filler.unlink()
    assert api.post("/v1/datasets", files={"file": ("calib.txt", b"calibration text " * 4000)}).status_code == 201


def test_submission_on_a_full_disk_is_507_and_no_job_is_left_queued(
    disk_api: tuple[Api, Path], model_root: Path
) -> None:
    api, disk = disk_api
    filler = fill(disk)
    assert_problem(api.post("/v1/jobs", json=tiny_job(model_root)), 507, "insufficient_storage")
    filler.unlink()
    # Whatever reached the store is marked failed (never a queued job the broker does not know).
    jobs = api.get("/v1/jobs").json()["items"]
    assert all(j["status"] == "failed" and j["error"]["code"] == "insufficient_storage" for j in jobs), jobs
    assert api.post("/v1/jobs", json=tiny_job(model_root)).status_code == 202
