"""Validation and storage of uploaded calibration datasets (.txt or .jsonl with a `text` field)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.errors import ApiError

FORMATS = ("txt", "jsonl")
CHUNK = 1 << 20


@dataclass
class StoredUpload:
    path: Path
    size_bytes: int
    sha256: str
    n_texts: int
    n_chars: int


def detect_format(filename: str, requested: str | None) -> str:
    fmt = requested or Path(filename).suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ApiError(
            415,
            "unsupported_format",
            f"Upload a .txt or .jsonl file (got {filename!r}); or pass format=txt|jsonl.",
        )
    return fmt


def store_upload(source: BinaryIO, fmt: str, tmp_dir: Path, final: Path, max_bytes: int) -> StoredUpload:
    """Copy the upload to a temp file (enforcing the size limit), validate it, then move it to `final`.

    `final` belongs to one dataset row, so a caller whose insert fails can delete it without
    touching another dataset's file. On any error here nothing is left behind.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"upload-{uuid.uuid4().hex}.{fmt}"
    digest = hashlib.sha256()
    size = 0
    try:
        with tmp.open("wb") as out:
            while block := source.read(CHUNK):
                size += len(block)
                if size > max_bytes:
                    raise ApiError(
                        413,
                        "upload_too_large",
                        f"The upload exceeds the limit of {max_bytes} bytes; send a smaller file.",
                    )
                digest.update(block)
                out.write(block)
        if size == 0:
            raise ApiError(422, "empty_upload", "The uploaded file is empty.")
        n_texts, n_chars = validate_text(tmp, fmt)
        os.replace(tmp, final)
        return StoredUpload(final, size, digest.hexdigest(), n_texts, n_chars)
    finally:
        tmp.unlink(missing_ok=True)


def validate_text(path: Path, fmt: str) -> tuple[int, int]:
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise ApiError(422, "binary_upload", "The upload contains NUL bytes; calibration data must be UTF-8 text.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            422,
            "binary_upload",
            f"The upload is not valid UTF-8 text (byte {exc.start}); calibration data must be text.",
        ) from exc
    if fmt == "txt":
        if not text.strip():
            raise ApiError(422, "empty_upload", "The uploaded text contains only whitespace.")
        return 1, len(text)
    n_texts = n_chars = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ApiError(422, "invalid_jsonl", f"Line {number} is not valid JSON: {exc.msg}.") from exc
        except RecursionError:
            # The C decoder stops at the interpreter's recursion limit (about 1000 levels) and
            # raises instead of crashing; a calibration record is one flat object.
            raise ApiError(
                422, "invalid_jsonl", f"Line {number} is nested too deeply; each line must be a flat JSON object."
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ApiError(422, "invalid_jsonl", f"Line {number} needs a string field 'text'.")
        n_texts += 1
        n_chars += len(record["text"])
    if n_texts == 0 or n_chars == 0:
        raise ApiError(422, "empty_upload", "The .jsonl file has no non-empty 'text' records.")
    return n_texts, n_chars
