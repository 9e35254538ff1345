"""A real `slimforge serve` (embedded default) with a tiny local model, and headless Debian Chromium."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service.test_e2e_serve import free_port
from tests.service.workers import Process, serve_env, slimforge_executable
from tests.tiny_models import make_tiny_llama_dir

CHROMIUM = Path("/usr/bin/chromium")
KEY_A = "sf_ui_key_tenant_a"


@dataclass
class Served:
    base_url: str
    model: str
    key_a: str
    key_b: str

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.key_a}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`slimforge serve` on a fresh data dir; tenant A has the bootstrap key, tenant B one from create-key."""
    root = tmp_path_factory.mktemp("ui")
    model = make_tiny_llama_dir(root / "models" / "tiny-llama", num_layers=8)
    env = serve_env(root / "data", KEY_A, root / "models", OMP_NUM_THREADS="1")
    port = free_port()
    server = Process(["serve", "--port", str(port)], env, root / "serve.log")
    try:
        server.wait_for_log("Uvicorn running", timeout=180)
        created = subprocess.run(
            [slimforge_executable(), "create-key", "--tenant", "team-b"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        yield Served(f"http://127.0.0.1:{port}", str(model), KEY_A, created.stdout.strip().splitlines()[-1])
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Debian Chromium driven by Playwright (never a downloaded browser)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing; run `bash scripts/system-deps.sh` (installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()
