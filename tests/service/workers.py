"""Start real `slimforge worker` / `slimforge serve` processes for tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process use exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMFORGE_")}
    # Tiny-model workers beside pytest and other servers: one thread avoids OpenMP spinning on 2 cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, list):
            # Paths are colon-separated; hub ids and networks (which contain ':') comma-separated.
            value = (":" if name == "allowed_model_roots" else ",").join(str(v) for v in value)
        env[f"SLIMFORGE_{name.upper()}"] = str(value)
    return env


def serve_env(data_dir: Path, key: str, model_root: Path, **extra: str) -> dict[str, str]:
    """The environment of an embedded `slimforge serve`: only a data dir, a key and a model root set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMFORGE_")}
    env.update(
        SLIMFORGE_DATA_DIR=str(data_dir), SLIMFORGE_BOOTSTRAP_KEY=key, SLIMFORGE_ALLOWED_MODEL_ROOTS=str(model_root)
    )
    env.update(extra)
    return env


def slimforge_executable() -> str:
    """The `slimforge` script of the running interpreter's environment (PATH may not include it)."""
    beside = Path(sys.executable).parent / "slimforge"
    found = str(beside) if beside.is_file() else shutil.which("slimforge")
    if found is None:
        raise RuntimeError("the slimforge command is not installed (pip install -e .)")
    return found


class Process:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [slimforge_executable(), *args], env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{needle!r} not seen within {timeout} s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL, as when a machine or the OOM killer takes the worker down."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if the process is still there after `timeout` seconds."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
