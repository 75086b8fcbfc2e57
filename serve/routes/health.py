import contextlib

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serve.deps import ServicesDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    """Postgres answers and at least one engine replica is up with production and the
    candidate loaded; 503 with details otherwise."""
    database = await _database_ok(services)
    engines = services.engines
    if database:
        with contextlib.suppress(Exception):  # the loop retries; this check must answer
            await engines.reconcile(await services.router.wanted())
    replicas = {r.url: r.ready for r in engines.replicas.values()}
    checks = {
        "database": database,
        "engine": any(r.healthy for r in engines.replicas.values()),
        "adapters": any(replicas.values()),
    }
    ready = all(checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks, "replicas": replicas},
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )


@router.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _database_ok(services: ServicesDep) -> bool:
    try:
        async with services.pool.connection(timeout=2.0) as conn:
            await conn.execute("SELECT 1")
    except Exception:
        return False
    return True
