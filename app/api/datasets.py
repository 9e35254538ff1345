"""/v1/datasets: upload and list calibration datasets."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, UploadFile
from sqlalchemy import select

from app.api.deps import ServicesDep, SessionDep, TenantDep
from app.datasets import detect_format, store_upload
from app.errors import ApiError
from app.inputs import require_plain_text
from app.models import Dataset, new_id
from app.openapi import V1_RESPONSES, responses
from app.quotas import check_storage_quota
from app.schemas import DatasetOut
from app.tenants import tenant_dir

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=V1_RESPONSES)


@router.post("", status_code=201, response_model=DatasetOut, responses=responses(413, 415, 507))
def upload_dataset(
    request: Request,
    file: UploadFile,
    services: ServicesDep,
    session: SessionDep,
    tenant: TenantDep,
    name: Annotated[str | None, Form(max_length=255)] = None,
    format: Annotated[str | None, Form()] = None,
) -> DatasetOut:
    settings = services.settings
    require_plain_text(name, "The dataset name")
    require_plain_text(file.filename, "The upload's file name")
    require_plain_text(format, "The format")
    fmt = detect_format(file.filename or "", format)
    check_storage_quota(session, tenant, settings)
    dataset_id = new_id("ds")
    # One file per dataset row, so a failed insert below can remove exactly what it stored.
    final = tenant_dir(settings.datasets_dir, tenant) / f"{dataset_id}.{fmt}"
    stored = store_upload(file.file, fmt, settings.tmp_dir, final, settings.max_upload_bytes)
    try:
        check_storage_quota(session, tenant, settings, incoming=stored.size_bytes)
        dataset = Dataset(
            id=dataset_id,
            tenant_id=tenant,
            name=name or (file.filename or "")[:255] or stored.sha256[:12],
            format=fmt,
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
            n_texts=stored.n_texts,
            n_chars=stored.n_chars,
            path=stored.path.relative_to(settings.data_dir).as_posix(),
        )
        session.add(dataset)
        session.commit()
    except BaseException:
        session.rollback()
        final.unlink(missing_ok=True)
        raise
    return DatasetOut.model_validate(dataset, from_attributes=True)


@router.get("", response_model=list[DatasetOut])
def list_datasets(session: SessionDep, tenant: TenantDep) -> list[DatasetOut]:
    rows = session.scalars(select(Dataset).where(Dataset.tenant_id == tenant).order_by(Dataset.created_at.desc()))
    return [DatasetOut.model_validate(r, from_attributes=True) for r in rows]


@router.get("/{dataset_id}", response_model=DatasetOut, responses=responses(404))
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetOut:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant:
        raise ApiError(404, "dataset_not_found", f"Dataset {dataset_id!r} does not exist.")
    return DatasetOut.model_validate(dataset, from_attributes=True)
