"""End to end: `slimforge serve` on the embedded default (SQLite, filesystem broker, in-process worker)."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import MODEL_CACHE
from tests.service.workers import Process, serve_env

KEY = "sf_e2e_key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(tmp_path: Path, model_root: Path) -> Iterator[httpx.Client]:
    """A `slimforge serve` subprocess with nothing configured but its data dir, key and model root."""

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (data_dir / "models").symlink_to(MODEL_CACHE)  # reuse the dequantised built-in models
    env = serve_env(data_dir, KEY, model_root)
    port = free_port()
    server = Process(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    try:
        server.wait_for_log("Uvicorn running", timeout=180)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ) as client:
            assert client.get("/readyz").json()["status"] == "ready"
            yield client
    finally:
        server.stop()
    assert (data_dir / "slimforge.db").is_file()  # the embedded store really was SQLite in the data dir


def run_to_completion(client: httpx.Client, body: dict, timeout: float) -> dict:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    location = response.headers["location"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(location).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1.0)
    raise TimeoutError(f"job still {job['status']} at stage {job['stage']}")


def download_and_verify(client: httpx.Client, artifact_id: str, out: Path) -> Path:
    """Fetch the tar archive, unpack it, and check every file against SHA256SUMS and the API listing."""
    listing = {f["path"]: f["sha256"] for f in client.get(f"/v1/artifacts/{artifact_id}").json()["files"]}
    archive = client.get(f"/v1/artifacts/{artifact_id}/archive")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(out, filter="data")
    root = out / artifact_id
    sums = dict(reversed(line.split("  ", 1)) for line in (root / "SHA256SUMS").read_text().splitlines())
    for path, digest in sums.items():
        assert hashlib.sha256((root / path).read_bytes()).hexdigest() == digest == listing[path]
    return root


def test_serve_runs_a_job_on_a_tiny_model_and_the_artifact_loads(
    served: httpx.Client, model_root: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    body = {
        "model": str(model_root / "tiny-llama"),
        "method": "shortgpt",
        "target_sparsity": 0.5,
        "sparsity_basis": "layers",
        "calibration": {"source": "self_generated", "n_samples": 2, "seq_len": 32},
    }
    job = run_to_completion(served, body, timeout=300)
    assert job["status"] == "succeeded", job
    root = download_and_verify(served, job["artifact_id"], tmp_path / "dl")
    model = AutoModelForCausalLM.from_pretrained(root)
    tokenizer = AutoTokenizer.from_pretrained(root)
    assert model.config.num_hidden_layers == 3
    ids = tokenizer("Slimforge prunes", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


@pytest.mark.slow
def test_quickstart_gradmap_on_real_smollm2(served: httpx.Client, tmp_path: Path, wikitext_text: str) -> None:
    """The README quickstart: GradMAP on builtin:smollm2-135m through HTTP, with an uploaded calibration set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    upload = served.post("/v1/datasets", files={"file": ("wiki.txt", wikitext_text[:200_000].encode())})
    assert upload.status_code == 201, upload.text
    body = {
        "model": "builtin:smollm2-135m",
        "method": "gradmap",
        "target_sparsity": 0.2,
        "sparsity_basis": "layers",
        "calibration": {"source": "dataset", "dataset_id": upload.json()["id"], "n_samples": 4, "seq_len": 64},
    }
    job = run_to_completion(served, body, timeout=900)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert len(result["removed_layers"]) == 6 and result["layers_after"] == 24
    root = download_and_verify(served, job["artifact_id"], tmp_path / "dl")
    model = AutoModelForCausalLM.from_pretrained(root)
    tokenizer = AutoTokenizer.from_pretrained(root)
    assert model.config.num_hidden_layers == 24
    text = wikitext_text[300_000:302_000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    # Dense SmolLM2 scores ~3.5 on this text and a uniform guess ~10.8; quality itself is measured in bench/.
    assert loss < 8.0, f"pruned model is broken: loss {loss:.2f}"
