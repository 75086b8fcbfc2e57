"""The gateway application: built by `create_app(settings, conninfo, ...)`, never at import."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from procrastinate import App as JobApp
from psycopg_pool import AsyncConnectionPool

import ratchet
from ratchet.db import make_pool
from ratchet.model import base_model_sha256
from ratchet.settings import Settings
from serve import errors
from serve.auth import Authenticator
from serve.chat import ChatService
from serve.comparisons import ComparisonService
from serve.deps import Services
from serve.metrics import Metrics
from serve.middleware import BodyLimit, RequestMetrics
from serve.replicas import EngineSet
from serve.routes import admin, chat, datasets, feedback, gate, health, models, reports, runs
from serve.routing import ModelRouter
from serve.supervisor import EngineSupervisor
from trainer.queue import deferring_app

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    conninfo: str,
    *,
    engine_url: str | None = None,
    supervisor: EngineSupervisor | None = None,
) -> FastAPI:
    """Build the gateway. With a supervisor, the engine is its child; else the replicas
    at `engine_url` (one, for tests) or the settings' engine URLs."""
    if supervisor:
        urls = [supervisor.url]
    elif engine_url:
        urls = [engine_url]
    elif settings.external_engines:
        urls = settings.engine_base_urls
    else:
        raise ValueError("create_app needs engine URLs or a supervisor")
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = make_pool(conninfo, settings.db_pool_max)
        await pool.open()
        await pool.wait(timeout=30.0)
        engines = EngineSet(
            urls,
            metrics,
            interval=settings.engine_check_interval_s,
            discover=settings.engine_discovery == "dns" and not supervisor,
        )
        if supervisor:
            supervisor.start()
        jobs = deferring_app()
        await jobs.open_async(pool)  # defers on our own pool; the worker runs the jobs
        app.state.services = _services(
            settings,
            conninfo,
            pool,
            engines,
            metrics,
            supervisor,
            await asyncio.to_thread(base_model_sha256, settings),
            jobs,
        )
        # One pass before the first request, so replicas that are up take it at once.
        with contextlib.suppress(Exception):
            await engines.reconcile(await app.state.services.router.wanted())
        engines.start(app.state.services.router.wanted)
        try:
            yield
        finally:
            # Each step on its own: one failing must not keep the others from running.
            try:
                await app.state.services.chat.drain()
                if supervisor:
                    await supervisor.stop()
            finally:
                try:
                    await engines.aclose()
                finally:
                    await pool.close()

    app = FastAPI(title="Ratchet", version=ratchet.__version__, lifespan=lifespan)
    errors.install(app)
    for module in (chat, models, feedback, admin, datasets, runs, gate, reports, health):
        app.include_router(module.router)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def _services(
    settings: Settings,
    conninfo: str,
    pool: AsyncConnectionPool,
    engines: EngineSet,
    metrics: Metrics,
    supervisor: EngineSupervisor | None,
    base_sha: str | None,
    jobs: JobApp,
) -> Services:
    router = ModelRouter(pool, engines, settings.registry_cache_seconds)
    chat_service = ChatService(
        pool=pool,
        engines=engines,
        router=router,
        metrics=metrics,
        max_tokens_cap=settings.max_tokens_cap,
        base_model_sha256=base_sha,
    )
    return Services(
        settings=settings,
        conninfo=conninfo,
        pool=pool,
        engines=engines,
        router=router,
        auth=Authenticator(pool, settings.auth_cache_seconds),
        metrics=metrics,
        chat=chat_service,
        comparisons=ComparisonService(pool, chat_service, router),
        supervisor=supervisor,
        base_model_sha256=base_sha,
        jobs=jobs,
    )
