"""Jobs with an `evaluation` option: before/after results stored, the dense side cached per model+config."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SHARED_DATA
from tests.service.conftest import Api, tiny_job
from tests.service.test_api_datasets import upload
from tests.service.test_api_jobs import assert_problem
from workers.runner import run_job


def run(api: Api, body: dict) -> dict:
    job = api.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    assert run_job(job.json()["id"], api.settings, api.client.app.state.services.sessions) == "succeeded"
    return api.get(f"/v1/jobs/{job.json()['id']}").json()


def test_evaluation_before_and_after_is_stored_and_dense_side_is_cached(api: Api, model_root: Path) -> None:
    dataset = upload(api, "eval.txt", b"Slimforge prunes language models and saves checkpoints. " * 40).json()
    evaluation = {"perplexity": [f"dataset:{dataset['id']}"], "seq_lens": [32], "speed": False}
    first = run(api, tiny_job(model_root, evaluation=evaluation))
    result = first["result"]["evaluation"]
    name = f"dataset:{dataset['id']}"
    before = result["before"]["perplexity"][name]
    after = result["after"]["perplexity"][name]
    assert result["before"]["cached"] is False
    assert before and after and before != after  # two layers fewer changes the model's perplexity
    second = run(api, tiny_job(model_root, evaluation=evaluation, seed=1))
    again = second["result"]["evaluation"]["before"]
    assert again["cached"] is True and again["perplexity"] == result["before"]["perplexity"]


def test_builtin_eval_texts_need_the_eval_data_dir(api: Api, model_root: Path) -> None:
    body = tiny_job(model_root, evaluation={"perplexity": ["wikitext2"]})
    assert_problem(api.post("/v1/jobs", json=body), 422, "eval_data_missing")
    assert_problem(
        api.post("/v1/jobs", json=tiny_job(model_root, evaluation={"tasks": ["nope"]})), 422, "invalid_evaluation"
    )
    api.settings.eval_data_dir = SHARED_DATA
    assert api.post("/v1/jobs", json=body).status_code == 202
