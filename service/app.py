"""The FastAPI app factory.

``create_app(settings)`` builds the engine, session factory and job dispatcher and hangs them on
``app.state`` (no module-level state). At startup the schema is migrated to head, or the app
refuses to start with a clear message when ``QAAS_AUTO_MIGRATE=false`` and the database is behind
(see :mod:`service.db.migrate`). Run with::

    uvicorn --factory service.app:create_app --host 0.0.0.0 --port 8000
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from sqlalchemy import Engine, text

from service.api import admin, jobs, models, recipes
from service.db.migrate import ensure_schema
from service.db.session import make_engine, make_session_factory
from service.dispatch import Dispatcher
from service.errors import error_response, install_error_handlers
from service.limits import BodySizeLimitMiddleware
from service.logging_setup import configure_logging
from service.settings import Settings

log = logging.getLogger("service")

#: optional routers owned by other contributors: (module, attribute); included when they import
OPTIONAL_ROUTERS: tuple[tuple[str, str], ...] = (("service.inference", "router"), ("service.dashboard", "router"))

DESCRIPTION = """Quantization as a service. Authenticate with `X-API-Key: <key>` or
`Authorization: Bearer <key>`. Every error has the body
`{"error": {"code": ..., "message": ..., "details": [{"field": ..., "message": ..., "type": ...}]}}`.
Jobs of other API keys answer 404."""


def _optional_routers() -> list[APIRouter]:
    found = []
    for module_name, attr in OPTIONAL_ROUTERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # the module itself is absent: nothing to mount
            raise
        router = getattr(module, attr, None)
        if isinstance(router, APIRouter):
            found.append(router)
    return found


def _default_dispatcher(settings: Settings) -> Dispatcher:
    from workers.app import CeleryDispatcher, create_celery_app

    return CeleryDispatcher(create_celery_app(settings))


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    dispatcher: Dispatcher | None = None,
    extra_routers: list[APIRouter] | None = None,
) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    settings.ensure_dirs()
    engine = engine or make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ensure_schema(engine, settings.auto_migrate)
        log.info("database schema current; serving")
        yield
        engine.dispose()

    app = FastAPI(title="qaas", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.dispatcher = dispatcher or _default_dispatcher(settings)

    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)

    for router in (models.router, recipes.router, jobs.router, admin.router):
        app.include_router(router)
    for router in _optional_routers() + list(extra_routers or []):
        app.include_router(router)

    @app.get("/healthz", tags=["health"], summary="Liveness and database reachability")
    def healthz() -> Any:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001
            return error_response(503, f"database unreachable: {type(exc).__name__}")
        return {"status": "ok"}

    return app
