"""A job run by the real runner in-process, then its artifact served with sha256, Range, ETag and tar."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from tests.service.conftest import KEY_B, Api, tiny_job
from tests.service.test_api_jobs import assert_problem
from workers.runner import run_job


@pytest.fixture
def finished_job(api: Api, model_root: Path) -> dict:
    job = api.post("/v1/jobs", json=tiny_job(model_root)).json()
    assert run_job(job["id"], api.settings, api.client.app.state.services.sessions) == "succeeded"
    return api.get(f"/v1/jobs/{job['id']}").json()


def test_succeeded_job_has_a_smaller_model_and_a_complete_report(api: Api, finished_job: dict) -> None:
    assert finished_job["status"] == "succeeded" and finished_job["progress"] == 100
    assert finished_job["attempts"] == 1
    result = finished_job["result"]
    assert result["removed_layers"] == [4, 5]
    assert result["parameters_after"]["total"] < result["parameters_before"]["total"]
    stages = [e["stage"] for e in api.get(f"/v1/jobs/{finished_job['id']}/events").json() if e["kind"] == "stage"]
    assert stages[0] == "loading_model" and stages[-1] == "saving" and "calibrating" in stages


def test_artifact_files_match_their_sha256_and_load(api: Api, finished_job: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    artifact = api.get(f"/v1/artifacts/{finished_job['artifact_id']}").json()
    names = {f["path"] for f in artifact["files"]}
    assert {"config.json", "model.safetensors", "slimforge_report.json", "SHA256SUMS", "README.md"} <= names
    assert "tokenizer.json" in names
    out = tmp_path / "download"
    out.mkdir()
    for entry in artifact["files"]:
        response = api.get(entry["url"])
        assert response.status_code == 200
        assert hashlib.sha256(response.content).hexdigest() == entry["sha256"]
        assert response.headers["etag"] == f'"{entry["sha256"]}"'
        (out / entry["path"]).write_bytes(response.content)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    report = json.loads((out / "slimforge_report.json").read_text())
    assert report["removed_layers"] == [4, 5] and report["source_model"].endswith("tiny-llama")
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, model.config.vocab_size)


def test_range_etag_and_errors_on_file_download(api: Api, finished_job: dict) -> None:
    artifact = api.get(f"/v1/artifacts/{finished_job['artifact_id']}").json()
    entry = next(f for f in artifact["files"] if f["path"] == "config.json")
    full = api.get(entry["url"]).content
    part = api.client.get(entry["url"], headers={**api.headers(), "Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == full[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(full)}"
    tail = api.client.get(entry["url"], headers={**api.headers(), "Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == full[-5:]
    beyond = api.client.get(entry["url"], headers={**api.headers(), "Range": f"bytes={len(full) + 10}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(full)}"
    cached = api.client.get(entry["url"], headers={**api.headers(), "If-None-Match": f'"{entry["sha256"]}"'})
    assert cached.status_code == 304
    stale = api.client.get(entry["url"], headers={**api.headers(), "Range": "bytes=0-3", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == full
    assert_problem(api.get(f"/v1/artifacts/{artifact['id']}/files/..%2F..%2Fslimforge.db"), 404, "file_not_found")
    assert_problem(api.get(f"/v1/artifacts/{artifact['id']}/files/nope.bin"), 404, "file_not_found")
    assert_problem(api.get(f"/v1/artifacts/{artifact['id']}", key=KEY_B), 404, "artifact_not_found")
    assert_problem(api.get(f"/v1/artifacts/{artifact['id']}/archive", key=KEY_B), 404, "artifact_not_found")


def test_archive_is_a_tar_of_every_file(api: Api, finished_job: dict) -> None:
    artifact = api.get(f"/v1/artifacts/{finished_job['artifact_id']}").json()
    response = api.get(artifact["archive_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    for entry in artifact["files"]:
        data = members[f"{artifact['id']}/{entry['path']}"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert len(members) == len(artifact["files"])


def test_cancel_while_running_publishes_nothing(api: Api, model_root: Path) -> None:
    from sqlalchemy import update

    from app.models import Job

    job = api.post("/v1/jobs", json=tiny_job(model_root)).json()
    sessions = api.client.app.state.services.sessions
    with sessions() as session:  # simulate a cancel that arrives once the job is running
        session.execute(update(Job).where(Job.id == job["id"]).values(status="cancelling", attempts=1))
        session.commit()
    # A worker that claims it now finds it not queued and does nothing.
    assert run_job(job["id"], api.settings, sessions) is None
    assert not any(api.settings.artifacts_dir.iterdir())


def test_terminal_state_is_posted_to_a_signed_webhook(
    api: Api, model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import http.server
    import threading

    from app.webhooks import SIGNATURE_HEADER, verify

    received: list[tuple[str, bytes]] = []
    done = threading.Event()

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((self.headers[SIGNATURE_HEADER], body))
            self.send_response(204)
            self.end_headers()
            done.set()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        assert_problem(api.post("/v1/jobs", json=tiny_job(model_root, webhook_url=url)), 422, "webhooks_disabled")
        api.settings.webhook_secret = "s3cret"
        # Loopback is refused unless the operator allow-lists it (at submit, and again at send time).
        assert_problem(api.post("/v1/jobs", json=tiny_job(model_root, webhook_url=url)), 422, "webhook_url_not_allowed")
        api.settings.webhook_allowed_networks = ["127.0.0.0/8"]
        monkeypatch.setenv("SLIMFORGE_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")  # what the worker reads
        job = api.post("/v1/jobs", json=tiny_job(model_root, webhook_url=url)).json()
        assert run_job(job["id"], api.settings, api.client.app.state.services.sessions) == "succeeded"
        assert done.wait(30)
    finally:
        server.shutdown()
    signature, body = received[0]
    assert verify("s3cret", signature, body) and not verify("wrong", signature, body)
    payload = json.loads(body)
    assert payload["event"] == "job.succeeded" and payload["job"]["id"] == job["id"]
    assert payload["job"]["artifact_id"]
