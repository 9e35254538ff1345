"""Cache of dense-baseline evaluations, so repeated jobs on one model do not recompute them.

Entries are JSON files keyed by the model key and a hash of the evaluation config (plus a
protocol version, bumped whenever scoring changes numbers). The caller chooses the model key;
it must change whenever the weights may change (e.g. include a checkpoint hash for local dirs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

PROTOCOL_VERSION = 1


def cache_key(model_key: str, config: BaseModel | dict[str, Any]) -> str:
    payload = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    blob = json.dumps({"model": model_key, "config": payload, "v": PROTOCOL_VERSION}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:24]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_key)[:64]
    return f"{readable}-{digest}"


def _atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_evaluate(
    cache_dir: Path, model_key: str, config: BaseModel | dict[str, Any], compute: Callable[[], dict]
) -> dict:
    """Return the cached result for (model_key, config), or run `compute()` and store it.

    The returned dict carries `"cached": True` when it came from the cache. An unreadable entry is
    recomputed and overwritten.
    """
    path = Path(cache_dir) / f"{cache_key(model_key, config)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8")) | {"cached": True}
        except (OSError, json.JSONDecodeError):
            pass
    result = compute()
    _atomic_write_json(path, {k: v for k, v in result.items() if k != "cached"})
    return result | {"cached": False}
