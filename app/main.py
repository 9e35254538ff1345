"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.api import artifacts, catalog, datasets, evaluations, health, jobs, ui
from app.errors import install_error_handlers
from app.heap import freeze_long_lived, freeze_survivors_of_full_passes
from app.inputs import ControlCharGuard
from app.limits import BodySizeLimit
from app.metrics import HttpLatency
from app.ratelimit import RateLimit
from app.services import Services
from app.settings import Settings, get_settings
from app.turns import TurnBudget

# Room for multipart framing around the largest allowed upload.
MULTIPART_OVERHEAD = 64 * 1024
# Threads for sync route bodies; each holds at most one pooled connection (app.db.POOL_*).
THREADPOOL_SIZE = 32


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = THREADPOOL_SIZE
    app.state.services.watch_events()  # job events drop cached job views (app.job_views) in this process
    freeze_long_lived()
    freeze_survivors_of_full_passes()
    yield


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or get_settings()
    # /docs and /redoc from assets shipped in the fastapi-offline package: nothing from a CDN.
    app = FastAPIOffline(
        title="Slimforge",
        version="1",
        description="Compression-as-a-service for LLMs: GradMAP layer pruning, LLM-Pruner width pruning.",
        lifespan=lifespan,
    )
    app.state.services = services or Services.build(settings)
    install_error_handlers(app)
    for module in (jobs, datasets, artifacts, catalog, evaluations, health):
        app.include_router(module.router)
    ui.install(app)  # the dashboard at /ui/
    # Added innermost first: a request meets the rate limiter, then the input guard, then the size limit.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(ControlCharGuard)
    app.add_middleware(RateLimit, settings=settings)
    app.add_middleware(TurnBudget, per_turn=settings.requests_per_loop_turn)
    app.add_middleware(HttpLatency)
    return app
