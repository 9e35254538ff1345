"""The compose file and Dockerfile stay consistent with the code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_declares_the_production_topology() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "worker", "postgres", "redis", "migrate"} <= set(services)
    assert services["migrate"]["command"] == ["slimforge", "migrate"]
    assert services["worker"]["command"] == ["slimforge", "worker"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    env = compose["x-slimforge-env"]
    assert env["SLIMFORGE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["SLIMFORGE_BROKER_URL"].startswith("redis://")


def test_dockerfile_has_cpu_and_cuda_variants() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "FROM base-${VARIANT}" in text and "AS base-cpu" in text and "AS base-cuda" in text
    for path in ("app", "workers", "migrations", "pyproject.toml"):
        assert f"COPY {path}" in text


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
def test_compose_file_validates() -> None:
    result = subprocess.run(["docker-compose", "config", "-q"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
