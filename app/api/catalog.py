"""/v1/models and /v1/methods: what a client can ask for."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import ServicesDep, TenantDep
from app.openapi import responses
from workers.engine.modelzoo import BUILTIN_MODELS, BUILTIN_PREFIX, builtin_installed
from workers.engine.registry import all_methods

router = APIRouter(prefix="/v1", tags=["catalog"], responses=responses(401, 429))


@router.get("/models")
def list_models(services: ServicesDep, _tenant: TenantDep) -> dict[str, Any]:
    builtins = [
        {
            "id": BUILTIN_PREFIX + model.name,
            "kind": "builtin",
            "description": model.description,
            "architecture": model.architecture,
            "num_layers": model.num_layers,
            "installed": builtin_installed(model.name),
            "cached": (services.settings.models_dir / model.name / "model.safetensors").is_file(),
        }
        for model in BUILTIN_MODELS.values()
    ]
    return {
        "models": builtins,
        "local_roots": [str(p) for p in services.settings.allowed_model_roots],
        "hub": "Hugging Face ids (org/name) resolve through the server's Hugging Face cache",
    }


@router.get("/methods")
def list_methods(_tenant: TenantDep) -> dict[str, Any]:
    return {
        "methods": [
            {
                "name": m.name,
                "kind": m.kind,
                "description": m.description,
                "options_schema": m.options_model.model_json_schema(),
            }
            for m in all_methods().values()
        ]
    }
