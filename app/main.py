"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.api import artifacts, catalog, datasets, evaluations, health, jobs
from app.errors import install_error_handlers
from app.limits import BodySizeLimit
from app.metrics import HttpLatency
from app.services import Services
from app.settings import Settings, get_settings

# Room for multipart framing around the largest allowed upload.
MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or get_settings()
    # /docs and /redoc from assets shipped in the fastapi-offline package: nothing from a CDN.
    app = FastAPIOffline(
        title="Slimforge",
        version="1",
        description="Compression-as-a-service for LLMs: GradMAP layer pruning, LLM-Pruner width pruning.",
    )
    app.state.services = services or Services.build(settings)
    install_error_handlers(app)
    for module in (jobs, datasets, artifacts, catalog, evaluations, health):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(HttpLatency)
    return app
