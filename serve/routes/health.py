from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ratchet.settings import mask_url
from serve.deps import ServicesDep

router = APIRouter(tags=["operations"])
_ROOM_BYTES = 64 << 10  # the spool must have room for a few more answers


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    """Ready when at least one engine replica is up with production and the candidate
    loaded, and answers can be stored: in Postgres, or in the spool while it is down
    (a gateway that can still serve stays in rotation). 503 with details otherwise,
    and from the moment a shutdown begins."""
    watch = services.watch
    database = watch.up and await watch.check(timeout=services.settings.db_acquire_timeout_s)
    engines = services.engines  # each replica's own loop keeps this up to date
    # Unauthenticated: a replica is named by its URL with any credentials masked.
    replicas = {mask_url(r.url): r.ready for r in engines.replicas.values()}
    spool = services.answers.spool
    accepting = database or (spool is not None and spool.room_for(_ROOM_BYTES))
    checks = {
        "database": database,
        "storage": accepting,
        "engine": any(r.healthy for r in engines.replicas.values()),
        "adapters": any(replicas.values()),
        "serving": not services.shutdown.draining,
    }
    ready = all(v for k, v in checks.items() if k != "database")
    body = {
        "status": "ready" if ready else ("draining" if services.shutdown.draining else "not_ready"),
        "checks": checks,
        "replicas": replicas,
        "spool": {
            "entries": spool.depth if spool else 0,
            "bytes": spool.bytes if spool else 0,
            "max_bytes": spool.max_bytes if spool else 0,
            "replaying": services.answers.spooling,
        },
    }
    return JSONResponse(
        body,
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )


@router.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
