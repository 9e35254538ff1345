"""The first-job path: forward-only progress, held-out quality, cancel in calibration, dtype, docs, metrics."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path

from safetensors import safe_open

from tests.service.conftest import Api, tiny_job
from tests.service.test_api_datasets import upload
from tests.service.test_api_jobs import assert_problem
from workers.runner import run_job

TERMINAL = {"succeeded", "failed", "cancelled"}


def start(api: Api, body: dict) -> tuple[str, threading.Thread, dict]:
    """Submit `body` and run it on a worker thread (the real runner against the real store)."""
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    outcome: dict = {}
    services = api.client.app.state.services

    def work() -> None:
        outcome["status"] = run_job(job_id, api.settings, services.sessions)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return job_id, thread, outcome


def test_progress_only_moves_forward_and_every_result_has_heldout_quality(api: Api, model_root: Path) -> None:
    dataset = upload(api, "eval.txt", b"Slimforge prunes language models and saves checkpoints. " * 40).json()
    body = tiny_job(
        model_root,
        method="gradmap",
        target_sparsity=0.34,
        calibration={"source": "self_generated", "n_samples": 4, "seq_len": 24},
        evaluation={"perplexity": [f"dataset:{dataset['id']}"], "seq_lens": [32], "speed": False},
    )
    job_id, thread, outcome = start(api, body)
    seen = []
    while thread.is_alive():
        seen.append(api.get(f"/v1/jobs/{job_id}").json()["progress"])
        time.sleep(0.02)
    thread.join()
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert outcome["status"] == "succeeded" and job["progress"] == 100
    events = api.get(f"/v1/jobs/{job_id}/events").json()
    reported = [e["data"]["progress"] for e in events if e["data"] and "progress" in e["data"]]
    stages = [e["stage"] for e in events if e["kind"] == "stage"]
    assert stages.count("evaluating") == 2 and {"calibrating", "scoring", "compensating", "saving"} <= set(stages)
    for series in (seen + [100.0], reported):
        assert series == sorted(series), series
    progress_events = [e for e in events if e["data"] and "progress" in e["data"]]
    assert all("eta_seconds" in e["data"] for e in progress_events)
    # An ETA exists once the job has run for a second and made 1 % of progress (a fast machine may finish first).
    started = datetime.fromisoformat(job["started_at"])
    late = [
        e
        for e in progress_events
        if (datetime.fromisoformat(e["created_at"]) - started).total_seconds() >= 1.5 and e["data"]["progress"] >= 1
    ]
    assert all(e["data"]["eta_seconds"] is not None for e in late), late

    heldout = job["result"]["heldout"]
    assert heldout["samples"] == 2 and heldout["seq_len"] == 24  # drawn beside the 4 calibration rows
    assert job["result"]["calibration_shape"] == [4, 24]
    # Compensation fits on its own budget: the 4 calibration rows and 28 more self-generated ones.
    compensation = job["result"]["compensation"]
    assert compensation["source"] == "compensation_data" and compensation["compensation_tokens"] == 32 * 24
    assert job["result"]["calibration"]["compensation_windows"] == 32
    for point in ("dense", "pruned"):
        assert heldout[point]["loss"] > 0 and heldout[point]["perplexity"] > 1
    if job["result"]["compensation"].get("kept"):
        assert heldout["compensated"]["loss"] != heldout["pruned"]["loss"]
    assert job["result"]["timings"]["calibrating"] > 0 and job["result"]["timings"]["heldout"] > 0

    # A dataset-calibrated job of another method has the same quality number.
    second = tiny_job(model_root, calibration={"source": "dataset", "dataset_id": dataset["id"], "n_samples": 3})
    second["calibration"]["seq_len"] = 16
    job_id, thread, outcome = start(api, second)
    thread.join()
    result = api.get(f"/v1/jobs/{job_id}").json()["result"]
    assert result["heldout"]["source"] == "dataset" and result["heldout"]["pruned"]["loss"] > 0

    api.settings.metrics_token = "operator-scrape-token"  # the operator's view: every tenant, workers, HTTP
    metrics = api.client.get("/metrics", headers={"Authorization": "Bearer operator-scrape-token"}).text
    assert 'slimforge_job_duration_seconds_count{method="gradmap",status="succeeded"} 1.0' in metrics
    assert 'slimforge_job_stage_seconds_count{method="gradmap",stage="calibrating"} 1.0' in metrics
    assert 'slimforge_job_queue_wait_seconds_count{method="last_k"} 1.0' in metrics
    assert "slimforge_worker_last_heartbeat_timestamp_seconds{" in metrics
    assert 'slimforge_http_request_duration_seconds_count{method="GET",route="/v1/jobs/{job_id}"' in metrics


def test_cancel_during_self_generated_calibration_ends_quickly(api: Api, model_root: Path) -> None:
    # 4 rows x 4000 new tokens: tens of seconds of sampling on a CPU, unless the cancel stops it.
    body = tiny_job(model_root, calibration={"source": "self_generated", "n_samples": 2, "seq_len": 4000})
    job_id, thread, outcome = start(api, body)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events = api.get(f"/v1/jobs/{job_id}/events").json()
        if any(e["message"].startswith("sampling") for e in events):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the job never started sampling")
    asked = time.monotonic()
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    thread.join(timeout=60)
    took = time.monotonic() - asked
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert outcome["status"] == "cancelled" and job["status"] == "cancelled"
    assert job["stage"] == "calibrating"  # a cancelled job keeps the stage it stopped in
    assert took <= 15.0, f"cancel took {took:.1f} s"


def test_artifact_dtype_bfloat16_halves_the_weights(api: Api, model_root: Path) -> None:
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        job_id, thread, outcome = start(api, tiny_job(model_root, artifact_dtype=dtype))
        thread.join()
        job = api.get(f"/v1/jobs/{job_id}").json()
        assert outcome["status"] == "succeeded", job["error"]
        assert job["result"]["artifact"]["dtype"] == dtype
        sizes[dtype] = job["result"]["artifact"]["weights_bytes"]
        art = api.get(f"/v1/artifacts/{job['artifact_id']}").json()
        assert art["total_bytes"] > sizes[dtype]
        path = api.settings.artifacts_dir / job["artifact_id"]
        with safe_open(str(path / "model.safetensors"), "pt") as weights:
            assert str(weights.get_tensor(next(iter(weights.keys()))).dtype) == f"torch.{dtype}"
        assert json.loads((path / "config.json").read_text())["dtype"] == dtype
        card = (path / "README.md").read_text()
        assert "Held-out calibration loss" in card and f"Weights: {dtype}" in card
        assert json.loads((path / "slimforge_report.json").read_text())["heldout"]["dense"]["loss"] > 0
    assert abs(sizes["bfloat16"] / sizes["float32"] - 0.5) < 0.01, sizes
    assert_problem(api.post("/v1/jobs", json=tiny_job(model_root, artifact_dtype="int8")), 422, "validation_error")


def test_docs_are_served_offline_and_evaluations_are_discoverable(api: Api, model_root: Path) -> None:
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = api.client.get(page).text
        assert asset in html and "http://" not in html and "https://" not in html, html
        script = html.split(asset)[0].rsplit('"', 1)[1] + asset
        assert api.client.get(script).status_code == 200
    schema = api.client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]
    evaluation = schema["evaluation"]["anyOf"][0]
    assert "tasks" in evaluation["properties"] and evaluation["examples"]

    catalogue = api.get("/v1/evaluations").json()
    assert [t["name"] for t in catalogue["tasks"]][:2] == ["piqa", "hellaswag"]
    assert catalogue["data_dir_configured"] is False and not any(t["available"] for t in catalogue["tasks"])
    response = api.post("/v1/jobs", json=tiny_job(model_root, evaluation={"tasks": ["mmlu"]}))
    assert_problem(response, 422, "invalid_evaluation")
    assert "arc_easy" in response.json()["detail"] and "winogrande" in response.json()["detail"]


def test_heartbeat_ticks_move_progress_between_sparse_reports_but_never_past_the_next(
    api: Api, model_root: Path
) -> None:
    from workers.job_state import JobState, ProgressPlan
    from workers.runner import claim

    job_id = api.post("/v1/jobs", json=tiny_job(model_root)).json()["id"]
    sessions = api.client.app.state.services.sessions
    state = JobState(sessions, job_id, claim(sessions, job_id), min_write_interval=0.0)
    state.plan = ProgressPlan.for_spec({"method": "gradmap", "target_sparsity": 0.5, "sparsity_basis": "layers"}, 4)
    state.progress("scoring", 0.0, "decision 1/2")
    time.sleep(0.2)
    state.progress("scoring", 0.5, "decision 2/2")  # one decision took 0.2 s and moved 1/2 of the stage
    reported = state.percent
    time.sleep(0.1)
    state.tick()
    moved = api.get(f"/v1/jobs/{job_id}").json()["progress"]
    low, high = state.plan.span(3)
    assert reported < moved < reported + 0.9 * (reported - low) + 0.01 and moved < high
    time.sleep(0.5)
    state.tick()  # far longer than a decision: capped below the next checkpoint
    capped = api.get(f"/v1/jobs/{job_id}").json()["progress"]
    assert moved <= capped <= reported + 0.9 * (reported - low) + 0.01
    state.progress("scoring", 0.5)  # a late report of the same point never moves the number back
    assert api.get(f"/v1/jobs/{job_id}").json()["progress"] >= capped
