"""Production mode for real: PostgreSQL + Redis + separate `slimforge worker` processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.service.conftest import (
    Api,
    fresh_pg_database,
    prepare_store,
    redis_settings,
    tiny_job,
)
from tests.service.workers import Process, settings_env

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def cluster(tmp_path: Path, model_root: Path) -> Iterator[tuple[Api, Settings, list[Process]]]:
    """An API client plus a list the test fills with worker processes; all torn down afterwards."""
    with fresh_pg_database() as url:
        settings = redis_settings(
            tmp_path / "data",
            url,
            model_root,
            heartbeat_seconds=0.5,
            heartbeat_timeout_seconds=4.0,
            reaper_interval_seconds=1.0,
        )
        prepare_store(settings)
        app = create_app(settings)
        workers: list[Process] = []
        try:
            with TestClient(app) as client:
                yield Api(client, settings), settings, workers
        finally:
            for worker in workers:
                worker.stop()
            app.state.services.engine.dispose()


def start_worker(settings: Settings, log_dir: Path, name: str) -> Process:
    worker = Process(["worker", "--hostname", f"{name}@%h"], settings_env(settings), log_dir / f"{name}.log")
    worker.wait_for_log("ready.", timeout=180)
    return worker


def wait_terminal(api: Api, job_ids: list[str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    jobs: dict[str, dict] = {}
    while time.monotonic() < deadline:
        jobs = {i: api.get(f"/v1/jobs/{i}").json() for i in job_ids}
        if all(j["status"] in TERMINAL for j in jobs.values()):
            return jobs
        time.sleep(0.5)
    raise TimeoutError(f"jobs not finished: {[(j['id'], j['status'], j['stage']) for j in jobs.values()]}")


def running_events(api: Api, job_id: str) -> list[dict]:
    events = api.get(f"/v1/jobs/{job_id}/events").json()
    return [e for e in events if e["kind"] == "status" and e["data"]["status"] == "running"]


def test_two_workers_run_concurrent_jobs_each_exactly_once(cluster, tmp_path: Path, model_root: Path) -> None:
    api, settings, workers = cluster
    workers += [start_worker(settings, tmp_path, "w1"), start_worker(settings, tmp_path, "w2")]
    ids = [api.post("/v1/jobs", json=tiny_job(model_root, seed=i)).json()["id"] for i in range(4)]
    jobs = wait_terminal(api, ids, timeout=300)
    assert {j["status"] for j in jobs.values()} == {"succeeded"}, jobs
    hosts = set()
    for job_id, job in jobs.items():
        assert job["attempts"] == 1
        runs = running_events(api, job_id)
        assert len(runs) == 1, runs  # claimed once, by one worker
        hosts.add(runs[0]["message"].rsplit(" on ", 1)[1])
        assert job["artifact_id"]
    assert len(hosts) == 2, f"both worker processes should have taken jobs, saw {hosts}"
    assert len({j["artifact_id"] for j in jobs.values()}) == 4


def _wait_running(api: Api, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["stage"] not in (None, "loading_model"):
            return job
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.05)
    raise TimeoutError("job never started")


# A job slow enough to be killed mid-way: sampling 600 calibration tokens one at a time.
SLOW = {"calibration": {"source": "self_generated", "n_samples": 2, "seq_len": 600}}


def test_sigkilled_worker_job_is_requeued_and_finished_by_another(cluster, tmp_path: Path, model_root: Path) -> None:
    api, settings, workers = cluster
    workers += [start_worker(settings, tmp_path, "w1"), start_worker(settings, tmp_path, "w2")]
    job_id = api.post("/v1/jobs", json=tiny_job(model_root, **SLOW)).json()["id"]
    running = _wait_running(api, job_id)
    victim = next(w for w in workers if running["attempts"] == 1 and f":{w.pid}" in _worker_of(api, job_id))
    victim.kill()
    killed_at = datetime.now(UTC)
    job = wait_terminal(api, [job_id], timeout=400)[job_id]
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    events = api.get(f"/v1/jobs/{job_id}/events").json()
    requeued = [e for e in events if "re-queued" in e["message"] and "no heartbeat" in e["message"]]
    assert len(requeued) == 1, events
    # Noticed within heartbeat timeout + reaper interval (4 s + 1 s here), plus scheduling slack.
    noticed_after = datetime.fromisoformat(requeued[0]["created_at"]) - killed_at
    assert noticed_after.total_seconds() < 4.0 + 1.0 + 5.0


def test_sigkilled_worker_on_last_attempt_fails_with_a_clear_error(cluster, tmp_path: Path, model_root: Path) -> None:
    api, settings, workers = cluster
    settings.max_attempts = 1  # jobs created from now on get a single attempt
    workers += [start_worker(settings, tmp_path, "w1"), start_worker(settings, tmp_path, "w2")]
    job_id = api.post("/v1/jobs", json=tiny_job(model_root, **SLOW)).json()["id"]
    _wait_running(api, job_id)
    next(w for w in workers if f":{w.pid}" in _worker_of(api, job_id)).kill()
    job = wait_terminal(api, [job_id], timeout=300)[job_id]
    assert job["status"] == "failed"
    assert job["error"]["code"] == "worker_lost"
    assert "no heartbeat" in job["error"]["message"] and "1 attempts" in job["error"]["message"]
    assert job["artifact_id"] is None


def _worker_of(api: Api, job_id: str) -> str:
    from app.models import Job

    with api.client.app.state.services.sessions() as session:
        job = session.get(Job, job_id)
        return job.worker if job and job.worker else ""
