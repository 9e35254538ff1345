"""Schemathesis against a live `slimforge serve` on loopback: no 5xx, and every status and content
type a route answers is declared in its OpenAPI document. Bounded to about two minutes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.service.test_e2e_serve import free_port
from tests.service.workers import Process, serve_env

KEY = "sf_schemathesis_key"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def schemathesis_executable() -> str | None:
    beside = Path(sys.executable).parent / "schemathesis"
    return str(beside) if beside.is_file() else shutil.which("schemathesis")


def test_fuzzed_requests_never_get_a_5xx_and_match_the_openapi_document(tmp_path: Path, model_root: Path) -> None:
    runner = schemathesis_executable()
    assert runner is not None, "schemathesis is a dev dependency: pip install -e '.[dev]'"
    env = serve_env(
        tmp_path / "data",
        KEY,
        model_root,
        # One address and one key send everything: the limiter would only shrink the coverage.
        SLIMFORGE_RATE_LIMIT_PER_ADDRESS="0",
        SLIMFORGE_RATE_LIMIT_PER_KEY="0",
        SLIMFORGE_AUTH_FAILURES_PER_MINUTE="0",
    )
    port = free_port()
    server = Process(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    try:
        server.wait_for_log("Uvicorn running", timeout=120)
        # A fixed seed keeps CI reproducible; NUL bytes are generated on purpose.
        result = subprocess.run(
            [runner, "run", f"http://127.0.0.1:{port}/openapi.json", "-H", f"Authorization: Bearer {KEY}",
             "--checks", CHECKS, "--max-examples", "20", "--max-time", "100", "--workers", "2", "--seed", "9",
             "--generation-allow-x00", "true", "--request-timeout", "20", "--no-color"],
            cwd=tmp_path, capture_output=True, text=True, timeout=170, env=env,
        )  # fmt: skip
    finally:
        server.stop()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert re.search(r"\d+ generated, \d+ passed", output), output[-3000:]
    server_errors = re.findall(r'" 5\d\d ', server.log())
    assert not server_errors, server.log()[-4000:]
