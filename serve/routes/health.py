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
    """Postgres and the engine answer, and the engine has production and the candidate
    loaded; 503 with details otherwise."""
    checks = {"database": await _database_ok(services), "engine": await _engine_ok(services)}
    checks["adapters"] = all(checks.values()) and await _adapters_ok(services)
    ready = all(checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
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


async def _engine_ok(services: ServicesDep) -> bool:
    if services.supervisor is not None and not services.supervisor.ready:
        return False
    return await services.engine.health()


async def _adapters_ok(services: ServicesDep) -> bool:
    try:
        await services.router.warm()
    except Exception:
        return False
    return True
