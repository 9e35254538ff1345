"""/v1/artifacts: file listing with sha256, single-file download (Range, ETag) and a tar stream."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from app.api.deps import ServicesDep, SessionDep, TenantDep
from app.errors import ApiError
from app.models import Artifact, ArtifactFile
from app.openapi import V1_RESPONSES, binary_response, empty_response, responses
from app.schemas import ArtifactFileOut, ArtifactOut

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"], responses=V1_RESPONSES)
FILE_RESPONSES = {
    200: binary_response("The whole file", "application/octet-stream"),
    206: binary_response("The requested byte range (Content-Range)", "application/octet-stream"),
    304: empty_response("Not modified (If-None-Match matched the ETag)"),
    416: empty_response("Range not satisfiable (Content-Range: bytes */size)"),
    **responses(404),
}
CHUNK = 1 << 20


def _tenant_artifact(session: SessionDep, tenant: str, artifact_id: str) -> Artifact:
    artifact = session.get(Artifact, artifact_id)
    if artifact is None or artifact.tenant_id != tenant:
        raise ApiError(404, "artifact_not_found", f"Artifact {artifact_id!r} does not exist.")
    return artifact


@router.get("/{artifact_id}", response_model=ArtifactOut, responses=responses(404))
def get_artifact(artifact_id: str, session: SessionDep, tenant: TenantDep) -> ArtifactOut:
    artifact = _tenant_artifact(session, tenant, artifact_id)
    base = f"/v1/artifacts/{artifact.id}"
    return ArtifactOut(
        id=artifact.id,
        job_id=artifact.job_id,
        total_bytes=artifact.total_bytes,
        created_at=artifact.created_at,
        files=[
            ArtifactFileOut(path=f.path, size_bytes=f.size_bytes, sha256=f.sha256, url=f"{base}/files/{f.path}")
            for f in artifact.files
        ],
        archive_url=f"{base}/archive",
    )


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """One `bytes=a-b` / `bytes=a-` / `bytes=-n` range -> inclusive (start, end); ValueError if unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise ValueError("only a single bytes range is supported")
    first, _, last = spec.strip().partition("-")
    if first == "":
        length = int(last)
        if length <= 0:
            raise ValueError("empty suffix range")
        return max(size - length, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise ValueError("range outside the file")
    return start, min(end, size - 1)


def _read(path: Path, start: int, end: int) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(start)
        remaining = end - start + 1
        while remaining > 0 and (block := handle.read(min(CHUNK, remaining))):
            remaining -= len(block)
            yield block


@router.get("/{artifact_id}/files/{file_path:path}", response_class=StreamingResponse, responses=FILE_RESPONSES)
def download_file(
    artifact_id: str, file_path: str, request: Request, services: ServicesDep, session: SessionDep, tenant: TenantDep
) -> Response:
    artifact = _tenant_artifact(session, tenant, artifact_id)
    # Only files recorded in the database are served, so no path can escape the artifact directory.
    record = next((f for f in artifact.files if f.path == file_path), None)
    if record is None:
        raise ApiError(404, "file_not_found", f"Artifact {artifact_id!r} has no file {file_path!r}.")
    path = services.settings.data_dir / artifact.path / record.path
    etag = f'"{record.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=31536000, immutable"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    size = record.size_bytes
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header and (if_range is None or if_range == etag):
        try:
            start, end = _parse_range(range_header, size)
        except ValueError:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
        return StreamingResponse(
            _read(path, start, end), status_code=206, headers=headers, media_type="application/octet-stream"
        )
    headers["Content-Length"] = str(size)
    return StreamingResponse(
        _read(path, 0, size - 1) if size else iter([b""]), headers=headers, media_type="application/octet-stream"
    )


def _tar_stream(root: Path, files: list[ArtifactFile], prefix: str) -> Iterator[bytes]:
    """Yield a POSIX tar of `files` chunk by chunk, never holding a whole file in memory."""
    for record in files:
        path = root / record.path
        info = tarfile.TarInfo(f"{prefix}/{record.path}")
        info.size = record.size_bytes
        info.mode = 0o644
        info.mtime = int(path.stat().st_mtime)
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        yield from _read(path, 0, record.size_bytes - 1)
        padding = -record.size_bytes % tarfile.BLOCKSIZE
        if padding:
            yield b"\0" * padding
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end-of-archive marker


@router.get(
    "/{artifact_id}/archive",
    response_class=StreamingResponse,
    responses={200: binary_response("A POSIX tar of the artifact", "application/x-tar"), **responses(404)},
)
def download_archive(artifact_id: str, services: ServicesDep, session: SessionDep, tenant: TenantDep) -> Response:
    """The whole artifact as one uncompressed tar (safetensors do not compress), streamed."""
    artifact = _tenant_artifact(session, tenant, artifact_id)
    root = services.settings.data_dir / artifact.path
    files = list(artifact.files)
    return StreamingResponse(
        _tar_stream(root, files, artifact.id),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{artifact.id}.tar"'},
    )
