"""The gateway application: built by `create_app(settings, conninfo, ...)`, never at import."""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from procrastinate import App as JobApp
from psycopg_pool import AsyncConnectionPool

import ratchet
from feedback.log import AnswerLog
from feedback.spool import Spool
from ratchet.db import DatabaseWatch, make_pool
from ratchet.engine import EngineClient
from ratchet.jobs import deferring_app
from ratchet.model import base_model_sha256
from ratchet.replicas import EngineSet
from ratchet.settings import Settings
from serve import errors
from serve.auth import Authenticator
from serve.chat import ChatService
from serve.comparisons import ComparisonService
from serve.deps import Services
from serve.lifecycle import Housekeeping, Shutdown
from serve.metrics import Metrics
from serve.middleware import BodyLimit, FeedbackCORS, RequestMetrics, SecurityHeaders
from serve.protocol import clean_body
from serve.quotas import Quotas
from serve.routes import admin, chat, datasets, feedback, gate, health, models, reports, runs
from serve.routing import ModelRouter
from serve.supervisor import EngineSupervisor
from serve.tokens import FeedbackTokens, load_secret

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
        # Where ops put adapters for `POST /v1/admin/adapters` (the API takes no others).
        for root in settings.import_roots:
            with contextlib.suppress(OSError):
                root.mkdir(parents=True, exist_ok=True)
        pool = make_pool(
            conninfo,
            settings.db_pool_max,
            acquire_timeout=settings.db_acquire_timeout_s,
            connect_timeout=settings.db_connect_timeout_s,
        )
        await pool.open()
        watch = DatabaseWatch(pool, interval=settings.db_probe_interval_s)
        if not await watch.check(timeout=settings.db_acquire_timeout_s):
            log.error("the database is not reachable at start-up; serving from the spool")
        engines = EngineSet(
            urls,
            metrics,
            interval=settings.engine_check_interval_s,
            discover=settings.engine_discovery == "dns" and not supervisor,
            client_factory=lambda url: EngineClient(url, settings.engine_timeouts),
        )
        if supervisor:
            supervisor.start()
        jobs = deferring_app()
        await jobs.open_async(pool)  # defers on our own pool; the worker runs the jobs
        services = _services(
            settings,
            conninfo,
            pool,
            watch,
            engines,
            metrics,
            supervisor,
            await asyncio.to_thread(base_model_sha256, settings),
            jobs,
            FeedbackTokens(await load_secret(settings, pool), settings.feedback_token_ttl_s),
        )
        app.state.services = services
        services.answers.open()
        metrics.watch(services.answers, watch)
        # One pass before the first request, so replicas that are up take it at once.
        with contextlib.suppress(Exception):
            await engines.reconcile(
                await services.router.wanted(), wait=settings.engine_admin_timeout_s
            )
        engines.start(services.router.wanted)
        services.housekeeping.start()
        try:
            yield
        finally:
            await _stop(services, supervisor)

    # clean_body: no route's model can let NUL, lone surrogates or NaN through.
    app = FastAPI(
        title="Ratchet",
        version=ratchet.__version__,
        lifespan=lifespan,
        dependencies=[Depends(clean_body)],
    )
    errors.install(app)
    for module in (chat, models, feedback, admin, datasets, runs, gate, reports, health):
        app.include_router(module.router)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.feedback_cors_origins:
        app.add_middleware(FeedbackCORS, origins=settings.feedback_cors_origins)
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, a 413 too
    return app


def begin_shutdown(app: FastAPI) -> None:
    """From the signal handler: not ready from now on, cut what runs past the grace."""
    services: Services | None = getattr(app.state, "services", None)
    if services is not None:
        services.shutdown.begin()


async def _stop(services: Services, supervisor: EngineSupervisor | None) -> None:
    """Each step on its own: one failing must not keep the others from running."""
    steps = [
        services.shutdown.aclose(),
        services.housekeeping.aclose(),
        services.chat.drain(),
        services.router.aclose(),
        _flush(services),
        services.answers.aclose(),
        supervisor.stop() if supervisor else asyncio.sleep(0),
        services.engines.aclose(),
        services.watch.aclose(),
        services.pool.close(),
    ]
    for step in steps:
        try:
            await step
        except Exception:
            log.exception("shutdown step failed")


async def _flush(services: Services) -> None:
    """Write what the spool holds into the database, if it answers; else it stays on
    disk and the next gateway to start here replays it."""
    if not await services.answers.flush(timeout=services.settings.shutdown_grace_s):
        log.warning(
            "the spool still holds %d write(s) in %s; they are replayed at the next start",
            services.answers.spool.depth if services.answers.spool else 0,
            services.settings.spool_path,
        )


def _services(
    settings: Settings,
    conninfo: str,
    pool: AsyncConnectionPool,
    watch: DatabaseWatch,
    engines: EngineSet,
    metrics: Metrics,
    supervisor: EngineSupervisor | None,
    base_sha: str | None,
    jobs: JobApp,
    tokens: FeedbackTokens,
) -> Services:
    gateway_id = uuid.uuid4()
    grace = settings.db_outage_grace_s
    router = ModelRouter(pool, engines, settings.registry_cache_seconds, watch, grace)
    spool = Spool(settings.spool_path, settings.spool_max_bytes) if settings.spool_enabled else None
    answers = AnswerLog(pool, watch, spool)
    chat_service = ChatService(
        answers=answers,
        engines=engines,
        router=router,
        metrics=metrics,
        max_tokens_cap=settings.max_tokens_cap,
        extra_request_fields=settings.extra_request_fields,
        base_model_sha256=base_sha,
        gateway_id=gateway_id,
        total_timeout=settings.engine_timeout_s,
        tokens=tokens,
    )
    quotas = Quotas(settings, metrics)
    return Services(
        settings=settings,
        conninfo=conninfo,
        pool=pool,
        watch=watch,
        engines=engines,
        router=router,
        auth=Authenticator(pool, settings.auth_cache_seconds, watch, grace, throttle=quotas),
        quotas=quotas,
        metrics=metrics,
        answers=answers,
        chat=chat_service,
        comparisons=ComparisonService(chat_service, router),
        tokens=tokens,
        supervisor=supervisor,
        base_model_sha256=base_sha,
        jobs=jobs,
        housekeeping=Housekeeping(
            pool, watch, chat_service, gateway_id, settings.gateway_heartbeat_s
        ),
        shutdown=Shutdown(chat_service, settings.shutdown_grace_s),
    )
