"""Overlap guard: evaluation must never score text that calibration or recovery trained on.

Texts are compared by fingerprints of their normalised lines (sha256 of each line of at least
`MIN_CHARS` characters, whitespace collapsed, case kept), so a copy of a part of the evaluation
text is found even inside a bigger upload or when re-uploaded under another id.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

MIN_CHARS = 40  # shorter lines (headings, blank-ish lines) repeat by chance across corpora
_SPACE = re.compile(r"\s+")


def line_fingerprints(texts: Iterable[str]) -> set[str]:
    prints = set()
    for text in texts:
        for line in text.splitlines():
            normal = _SPACE.sub(" ", line).strip()
            if len(normal) >= MIN_CHARS:
                prints.add(hashlib.sha256(normal.encode()).hexdigest())
    return prints


def shared_lines(training: Iterable[str], evaluation: Iterable[str]) -> int:
    """How many distinct long lines of the evaluation text also occur in the training text."""
    return len(line_fingerprints(training) & line_fingerprints(evaluation))
