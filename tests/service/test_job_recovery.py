"""Jobs with `recovery` and `target`: validation, the overlap guard, results, cancel while recovering."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import func, select

from app.models import Artifact, Job
from tests.conftest import SHARED_DATA
from tests.service.conftest import Api, tiny_job
from tests.service.test_api_datasets import upload
from tests.service.test_api_jobs import assert_problem
from workers.runner import run_job

TEXT = b"Slimforge prunes language models and saves plain checkpoints for them.\n" * 40
OTHER = b"Evaluation text that no calibration or recovery run has ever seen before.\n" * 40
RECOVERY = {"method": "distill", "n_samples": 4, "seq_len": 16, "steps": 2, "batch_size": 2, "micro_batch_size": 1}


def run(api: Api, body: dict) -> tuple[str | None, dict]:
    job = api.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    status = run_job(job.json()["id"], api.settings, api.client.app.state.services.sessions)
    return status, api.get(f"/v1/jobs/{job.json()['id']}").json()


def test_recovery_job_reports_three_steps_and_its_data(api: Api, model_root: Path) -> None:
    held_out = upload(api, "held.txt", OTHER).json()
    evaluation = {"perplexity": [f"dataset:{held_out['id']}"], "seq_lens": [32], "speed": False}
    status, job = run(api, tiny_job(model_root, recovery=RECOVERY, evaluation=evaluation))
    assert status == "succeeded", job["error"]
    result = job["result"]
    assert result["recovery"]["data"] == "self_generated" and len(result["recovery"]["data_tokens_sha256"]) == 64
    assert result["recovery"]["steps_run"] == 2 and len(result["recovery"]["loss_curve"]) == 2
    assert set(result["evaluation"]) == {"before", "after_pruning", "after"}
    assert job["recovery"]["method"] == "distill"


def test_overlap_guard_refuses_evaluation_on_training_text(api: Api, model_root: Path) -> None:
    train = upload(api, "train.txt", TEXT).json()
    superset = upload(api, "superset.txt", OTHER + TEXT[:300]).json()  # contains lines of the training text
    calibration = {"source": "dataset", "dataset_id": train["id"], "n_samples": 2, "seq_len": 16}
    for name in (train["id"], superset["id"]):
        body = tiny_job(model_root, calibration=calibration, evaluation={"perplexity": [f"dataset:{name}"]})
        assert "calibration" in assert_problem(api.post("/v1/jobs", json=body), 422, "evaluation_overlap")["detail"]
    recovery = {**RECOVERY, "data": "dataset", "dataset_id": train["id"]}
    body = tiny_job(
        model_root, recovery=recovery, target={"max_perplexity_ratio": 2, "perplexity_set": f"dataset:{train['id']}"}
    )
    body.pop("target_sparsity")
    assert "recovery" in assert_problem(api.post("/v1/jobs", json=body), 422, "evaluation_overlap")["detail"]
    # A slice of WikiText-2 as training data may not be scored on the built-in WikiText-2 text.
    wiki = (SHARED_DATA / "wikitext2-valid.txt").read_text(encoding="utf-8").splitlines()[:60]
    wiki_upload = upload(api, "wiki.txt", "\n".join(wiki).encode()).json()
    api.settings.eval_data_dir = SHARED_DATA
    calibration = {"source": "dataset", "dataset_id": wiki_upload["id"], "n_samples": 2, "seq_len": 16}
    body = tiny_job(model_root, calibration=calibration, evaluation={"perplexity": ["wikitext2"]})
    assert_problem(api.post("/v1/jobs", json=body), 422, "evaluation_overlap")
    body = tiny_job(model_root, calibration=calibration, evaluation={"perplexity": ["ptb"]})
    assert api.post("/v1/jobs", json=body).status_code == 202


def test_size_is_target_sparsity_or_target_never_both(api: Api, model_root: Path) -> None:
    target = {"max_perplexity_ratio": 1.3}
    assert_problem(api.post("/v1/jobs", json=tiny_job(model_root, target=target)), 422, "validation_error")
    neither = tiny_job(model_root)
    neither.pop("target_sparsity")
    assert_problem(api.post("/v1/jobs", json=neither), 422, "validation_error")
    bad = tiny_job(model_root, recovery={"method": "sft"})
    assert_problem(api.post("/v1/jobs", json=bad), 422, "validation_error")


def held_out_budget_job(api: Api, model_root: Path, target: dict[str, object], **job: object) -> dict[str, object]:
    """A tiny job with a loose perplexity budget on an uploaded held-out text, instead of a sparsity."""
    held_out = upload(api, "held.txt", OTHER).json()
    budget = {
        "max_perplexity_ratio": 1000,
        "perplexity_set": f"dataset:{held_out['id']}",
        "max_sparsity": 0.34,
        "eval_tokens": 256,
        "seq_len": 32,
        **target,
    }
    body = tiny_job(model_root, target=budget, **job)
    body.pop("target_sparsity")
    return body


def test_quality_target_job_publishes_the_chosen_model_and_curve(api: Api, model_root: Path) -> None:
    body = held_out_budget_job(api, model_root, {"full_curve": True})
    plan = api.post("/v1/jobs?dry_run=true", json={**body, "recovery": RECOVERY}).json()["plan"]
    assert plan["quality_target"]["max_perplexity_ratio"] == 1000
    assert plan["recovery"]["tokens"] == 2 * 2 * 16 and plan["recovery"]["estimated_seconds"] >= 0
    status, job = run(api, body)
    assert status == "succeeded", job["error"]
    q = job["result"]["quality_target"]
    assert job["target_sparsity"] is None and q["chosen_size"] == 2 and [p["size"] for p in q["curve"]] == [1, 2]
    assert q["dense_cached"] is False
    # The same budget again: the dense side is read from the evaluation cache, the answer is the same.
    status, again = run(api, body)
    assert status == "succeeded", again["error"]
    repeat = again["result"]["quality_target"]
    assert repeat["dense_cached"] is True and repeat["dense_value"] == q["dense_value"]
    assert [p["value"] for p in repeat["curve"]] == [p["value"] for p in q["curve"]]
    # A random model answers 20 two-way questions right by chance, never 99 % of them.
    api.settings.eval_data_dir = SHARED_DATA
    floor = {"min_zero_shot_accuracy": 0.99, "tasks": ["piqa"], "limit": 20, "max_sparsity": 0.34}
    unreachable = tiny_job(model_root, target=floor)
    unreachable.pop("target_sparsity")
    status, job = run(api, unreachable)
    assert status == "failed" and job["error"]["code"] == "target_unreachable"
    assert "No candidate meets the budget" in job["error"]["message"]


def test_gradmap_quality_target_job_predicts_every_size_from_its_one_selection(api: Api, model_root: Path) -> None:
    body = held_out_budget_job(api, model_root, {}, method="gradmap")
    status, job = run(api, body)
    assert status == "succeeded", job["error"]
    q = job["result"]["quality_target"]
    assert [p["size"] for p in q["predictions"]] == [1, 2] and all(p["meets"] for p in q["predictions"])
    # Both sizes were predicted within the budget: one exact probe, at the largest, decides.
    assert q["chosen_size"] == 2 and [p["size"] for p in q["curve"]] == [2]
    assert job["result"]["removed_layers"] == sorted(q["removal_order"][:2])


def test_cancel_during_recovering_publishes_nothing(api: Api, model_root: Path) -> None:
    sessions = api.client.app.state.services.sessions
    long_recovery = {**RECOVERY, "steps": 1_000_000}
    job = api.post("/v1/jobs", json=tiny_job(model_root, recovery=long_recovery)).json()
    outcome: dict[str, str | None] = {}
    worker = threading.Thread(target=lambda: outcome.update(status=run_job(job["id"], api.settings, sessions)))
    worker.start()
    deadline = time.monotonic() + 120
    while api.get(f"/v1/jobs/{job['id']}").json()["stage"] != "recovering":
        assert time.monotonic() < deadline and worker.is_alive()
        time.sleep(0.1)
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelling"
    worker.join(60)
    assert outcome["status"] == "cancelled"
    with sessions() as session:
        assert session.get(Job, job["id"]).artifact_id is None
        assert session.scalar(select(func.count()).select_from(Artifact)) == 0
    assert not any(api.settings.artifacts_dir.iterdir())
