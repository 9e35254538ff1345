"""File permissions of the data directory: nothing the service writes is readable by other users."""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077


def restrict_umask() -> None:
    """Files and directories created from now on by this process are owner-only (0600 / 0700).

    Called once at process start (from Settings.ensure_dirs, which every entry point runs), so the
    SQLite file, its WAL, uploads, artifacts and the embedded queue are all created private.
    """
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> None:
    """Create `path` (and parents) and make it 0700, also when it already existed more open."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)


def private_file(path: Path) -> None:
    """Make an existing file 0600 (a store created by an older version may be world-readable)."""
    try:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
    except FileNotFoundError:
        pass
