"""The fault suite: kill and restart the real pieces under running and queued jobs.

Each test asserts the same invariants: every job ends exactly once (one terminal status event, no
attempt spent by anything but a lost heartbeat), and no partial artifact is listed or left behind.
Redis and PostgreSQL here are private servers (tests/service/servers.py), never the machine's.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.service.conftest import KEY_A, Api, fresh_pg_database, make_settings, prepare_store, tiny_job
from tests.service.servers import PostgresCluster, RedisServer, free_port
from tests.service.test_celery_workers import TERMINAL, start_worker, wait_terminal
from tests.service.workers import Process, serve_env

# Long enough to be interrupted: sampling one 1,500-token calibration sequence on the tiny model.
SLOW = {"calibration": {"source": "self_generated", "n_samples": 1, "seq_len": 1500}}
# How long a SIGTERMed process may take to hand its job back (the next cancel check of the job).
GRACE = 120.0


def fault_settings(tmp_path: Path, database_url: str, model_root: Path, broker_url: str) -> Settings:
    return make_settings(
        tmp_path / "data",
        database_url,
        model_root,
        broker_url=broker_url,
        queue_name=f"fault-{uuid.uuid4().hex[:8]}",
        heartbeat_seconds=0.5,
        heartbeat_timeout_seconds=30.0,  # long: these faults must never look like a lost worker
        reaper_interval_seconds=1.0,
        requeue_grace_seconds=2.0,
    )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def pg_cluster() -> Iterator[PostgresCluster]:
    # Not under tmp_path: pytest makes that 0700, and the cluster runs as the postgres user.
    workdir = Path(tempfile.mkdtemp(prefix="slimforge-pg-"))
    cluster = PostgresCluster(workdir).start()
    yield cluster
    cluster.stop("immediate")
    shutil.rmtree(workdir, ignore_errors=True)


def api_for(settings: Settings) -> Iterator[Api]:
    prepare_store(settings)
    app = create_app(settings)
    with TestClient(app) as client:
        yield Api(client, settings)
    app.state.services.engine.dispose()


def wait_status(api: Api, job_id: str, predicate, timeout: float = 180.0) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        response = api.get(f"/v1/jobs/{job_id}")
        if response.status_code == 200:
            job = response.json()
            if predicate(job):
                return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} never reached the expected state; last seen {job}")


def running_in_calibration(job: dict) -> bool:
    return job["status"] == "running" and job["stage"] == "calibrating"


def assert_ended_exactly_once(api: Api, jobs: dict[str, dict], data_dir: Path) -> None:
    for job_id, job in jobs.items():
        events = api.get(f"/v1/jobs/{job_id}/events").json()
        ends = [e for e in events if e["kind"] == "status" and e["data"]["status"] in TERMINAL]
        assert len(ends) == 1, (job_id, ends)
        assert ends[0]["data"]["status"] == job["status"]
    published = {j["artifact_id"] for j in jobs.values() if j["status"] == "succeeded"}
    on_disk = {p.name for p in (data_dir / "artifacts").iterdir()}
    assert on_disk == published, f"artifacts on disk {on_disk} != listed {published}"
    assert not list((data_dir / "tmp").iterdir()), "a partial artifact was left in tmp/"


def test_redis_crash_without_persistence_loses_no_queued_or_running_job(
    redis_server: RedisServer, tmp_path: Path, model_root: Path
) -> None:
    with fresh_pg_database() as url:
        settings = fault_settings(tmp_path, url, model_root, redis_server.url)
        for api in api_for(settings):
            worker = start_worker(settings, tmp_path, "w1")
            try:
                running = api.post("/v1/jobs", json=tiny_job(model_root, **SLOW)).json()["id"]
                wait_status(api, running, running_in_calibration)
                queued = [api.post("/v1/jobs", json=tiny_job(model_root, seed=i)).json()["id"] for i in range(2)]
                redis_server.crash()  # the two queued messages and the running one's unacked copy are gone
                time.sleep(1.0)
                redis_server.start()
                jobs = wait_terminal(api, [running, *queued], timeout=300)
            finally:
                worker.stop()
            assert {j["status"] for j in jobs.values()} == {"succeeded"}, jobs
            assert all(j["attempts"] == 1 for j in jobs.values()), jobs
            for job_id in queued:
                messages = [e["message"] for e in api.get(f"/v1/jobs/{job_id}/events").json()]
                assert any("re-sent to the queue" in m for m in messages), messages
            assert_ended_exactly_once(api, jobs, settings.data_dir)


def test_sigterm_worker_hands_its_job_back_without_spending_an_attempt(
    redis_server: RedisServer, tmp_path: Path, model_root: Path
) -> None:
    with fresh_pg_database() as url:
        settings = fault_settings(tmp_path, url, model_root, redis_server.url)
        for api in api_for(settings):
            first = start_worker(settings, tmp_path, "w1")
            job_id = api.post("/v1/jobs", json=tiny_job(model_root, **SLOW)).json()["id"]
            wait_status(api, job_id, running_in_calibration)
            first.stop(timeout=GRACE)  # SIGTERM: Celery's warm shutdown; the job hands itself back
            handed = wait_status(api, job_id, lambda j: j["status"] == "queued", timeout=60)
            assert handed["attempts"] == 0
            second = start_worker(settings, tmp_path, "w2")
            try:
                jobs = wait_terminal(api, [job_id], timeout=300)
            finally:
                second.stop()
            assert jobs[job_id]["status"] == "succeeded" and jobs[job_id]["attempts"] == 1, jobs
            messages = [e["message"] for e in api.get(f"/v1/jobs/{job_id}/events").json()]
            assert any("handed back" in m for m in messages), messages
            assert_ended_exactly_once(api, jobs, settings.data_dir)


def test_sigterm_of_the_embedded_server_hands_the_job_back_and_a_restart_finishes_it(
    tmp_path: Path, model_root: Path
) -> None:
    data_dir = tmp_path / "data"
    env = serve_env(
        data_dir,
        KEY_A,
        model_root,
        SLIMFORGE_HEARTBEAT_SECONDS="0.5",
        SLIMFORGE_SHUTDOWN_GRACE_SECONDS=str(GRACE),
        OMP_NUM_THREADS="1",
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY_A}"}

    def serve(name: str) -> Process:
        server = Process(["serve", "--port", str(port)], env, tmp_path / f"{name}.log")
        server.wait_for_log("Uvicorn running", timeout=180)
        return server

    server = serve("serve1")
    try:
        job_id = httpx.post(f"{base}/v1/jobs", json=tiny_job(model_root, **SLOW), headers=headers).json()["id"]
        deadline = time.monotonic() + 120
        while httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers).json()["stage"] != "calibrating":
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.1)
    finally:
        server.stop(timeout=GRACE)  # SIGTERM
    assert server.proc.returncode is not None
    server = serve("serve2")
    try:
        deadline = time.monotonic() + 300
        while (job := httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers).json())["status"] not in TERMINAL:
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        events = httpx.get(f"{base}/v1/jobs/{job_id}/events", headers=headers).json()
    finally:
        server.stop()
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert any("handed back" in e["message"] for e in events), [e["message"] for e in events]
    assert len([e for e in events if e["kind"] == "status" and e["data"]["status"] in TERMINAL]) == 1


def test_postgres_restart_during_a_job_keeps_api_and_job_consistent(
    pg_cluster: PostgresCluster, redis_server: RedisServer, tmp_path: Path, model_root: Path
) -> None:
    settings = fault_settings(tmp_path, pg_cluster.url, model_root, redis_server.url)
    for api in api_for(settings):
        worker = start_worker(settings, tmp_path, "w1")
        try:
            job_id = api.post("/v1/jobs", json=tiny_job(model_root, **SLOW)).json()["id"]
            wait_status(api, job_id, running_in_calibration)
            pg_cluster.stop("immediate")
            time.sleep(settings.job_read_max_age_seconds + 0.1)  # past what a poll may answer from memory
            down = api.get(f"/v1/jobs/{job_id}")
            assert down.status_code == 503 and down.json()["code"] == "database_unavailable", down.text
            assert api.client.get("/healthz").status_code == 200
            time.sleep(3.0)
            pg_cluster.start()
            jobs = wait_terminal(api, [job_id], timeout=300)
        finally:
            worker.stop()
        assert jobs[job_id]["status"] == "succeeded" and jobs[job_id]["attempts"] == 1, jobs
        assert_ended_exactly_once(api, jobs, settings.data_dir)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: room for the store's directories, not for a model."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.decode().strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_export_fails_the_job_cleanly(
    small_disk: Path, redis_server: RedisServer, tmp_path: Path, model_root: Path
) -> None:
    with fresh_pg_database() as url:
        settings = fault_settings(tmp_path, url, model_root, redis_server.url)
        settings.data_dir = small_disk / "data"
        for api in api_for(settings):
            worker = start_worker(settings, tmp_path, "w1")
            try:
                job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
                jobs = wait_terminal(api, [job_id], timeout=180)
            finally:
                worker.stop()
            job = jobs[job_id]
            assert job["status"] == "failed" and job["error"]["code"] == "disk_full", job
            assert "ran out of space" in job["error"]["message"] and job["artifact_id"] is None
            assert_ended_exactly_once(api, jobs, settings.data_dir)
