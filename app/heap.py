"""Garbage-collector settings for a long-running server process.

A full collection walks every tracked object. In a process that has loaded torch, transformers and
the ORM that is millions of long-lived objects, and each full pass stalled every request for
80-250 ms, several times a minute under load (docs/reliability.md). Freezing what exists after
start-up, and again after each job (which imports and builds models lazily), moves those objects
out of the collector's walk; the request path only ever creates short-lived garbage.
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    """Collect what is garbage now, then exempt every surviving object from future collections."""
    gc.collect()
    gc.freeze()
