"""/v1/evaluations: the perplexity texts and zero-shot tasks a job's `evaluation` can ask for here."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import ServicesDep, TenantDep
from workers.engine.evaluation.config import catalogue

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/evaluations")
def list_evaluations(services: ServicesDep, _tenant: TenantDep) -> dict[str, Any]:
    """Each set with `available` (its data is on this server, under SLIMFORGE_EVAL_DATA_DIR)."""
    return catalogue(services.settings.eval_data_dir)
