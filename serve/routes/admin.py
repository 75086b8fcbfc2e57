import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from ratchet import registry
from ratchet.engine import EngineClient, EngineRejected, EngineUnavailable
from ratchet.registry import Adapter, AdapterError
from serve.deps import OpsKey, Services, ServicesDep
from serve.errors import Conflict, InvalidRequest
from serve.protocol import AdapterRegisterRequest

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/adapters")
async def list_adapters(_: OpsKey, services: ServicesDep) -> list[Adapter]:
    """Every registered adapter, newest first."""
    async with services.pool.connection() as conn:
        return await registry.list_adapters(conn)


@router.get("/engines")
async def list_engines(_: OpsKey, services: ServicesDep) -> dict[str, Any]:
    """Each engine replica: ready or not, the adapters it has loaded, what it misses."""
    wanted = await services.router.wanted()
    replicas = [r.view(wanted) for r in services.engines.replicas.values()]
    return {
        "object": "list",
        "wanted": [{"engine_name": a.engine_name, "status": a.status} for a in wanted],
        "data": replicas,
    }


@router.post("/adapters", status_code=201)
async def register_adapter(
    request: AdapterRegisterRequest, _: OpsKey, services: ServicesDep
) -> Adapter:
    """Register a PEFT LoRA directory as the new `candidate`, loading it into the engine."""
    source = Path(request.path)
    try:
        config = registry.check_adapter_dir(source)
    except AdapterError as exc:
        raise InvalidRequest(str(exc), param="path", code="invalid_adapter") from exc
    rank = int(config["r"])
    if rank > services.settings.engine_max_lora_rank:
        raise InvalidRequest(
            f"adapter rank {rank} is over the engine's max_lora_rank "
            f"{services.settings.engine_max_lora_rank}",
            param="path",
            code="invalid_adapter",
        )
    # One registration at a time: two racing copies of one adapter must not delete
    # each other's files.
    async with _REGISTERING:
        return await _register(source, services)


_REGISTERING = asyncio.Lock()


async def _register(source: Path, services: Services) -> Adapter:
    adapters_dir = services.settings.adapters_dir
    sha, stored = await asyncio.to_thread(registry.store_files, source, adapters_dir)
    async with services.pool.connection() as conn:
        known = await registry.get_by_sha(conn, sha)
    if known is not None:
        raise Conflict(
            f"adapter {sha} is already registered (status {known.status}).",
            param="path",
            code="adapter_exists",
        )
    name = registry.engine_name_for(sha)
    engines = services.engines.reachable()
    try:
        if not engines:
            raise EngineUnavailable("no engine replica is reachable to load the adapter into")
        for engine in engines:
            await _load(engine, name, stored)
        async with services.pool.connection() as conn:
            adapter = await registry.register(
                conn, sha, stored, services.base_model_sha256, source="api"
            )
    except BaseException:
        # Not registered: leave neither files nor a loaded adapter behind.
        shutil.rmtree(stored, ignore_errors=True)
        for engine in engines:
            with contextlib.suppress(Exception):
                await engine.unload_adapter(name)
        raise
    services.router.invalidate()
    return adapter


async def _load(engine: EngineClient, name: str, stored: Path) -> None:
    try:
        await engine.load_adapter(name, str(stored))
    except EngineRejected as exc:
        if "already" not in exc.message:  # loaded by an earlier, failed attempt
            raise InvalidRequest(
                f"the engine refused the adapter: {exc.message}",
                param="path",
                code="invalid_adapter",
            ) from exc
