"""docker-compose.yml never falls back to a fixed API key: the api refuses to start without one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_api_refuses_to_start_without_a_bootstrap_key() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert compose["x-slimforge-env"]["SLIMFORGE_BOOTSTRAP_KEY"] == "${SLIMFORGE_BOOTSTRAP_KEY:-}"
    shell, flag, script = compose["services"]["api"]["command"]
    # Compose turns `$$` into `$`; stand in for `slimforge serve` with `echo` to see what would run.
    script = script.replace("$$", "$").replace("exec slimforge serve", "echo serving")
    env = {k: v for k, v in os.environ.items() if k != "SLIMFORGE_BOOTSTRAP_KEY"}
    refused = subprocess.run([shell, flag, script], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "SLIMFORGE_BOOTSTRAP_KEY is not set" in refused.stderr
    started = subprocess.run(
        [shell, flag, script], env={**env, "SLIMFORGE_BOOTSTRAP_KEY": "k"}, capture_output=True, text=True
    )
    assert started.returncode == 0 and started.stdout.startswith("serving --host 0.0.0.0")
