import asyncio
import contextlib
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from ratchet import registry
from ratchet.engine import EngineClient, EngineRejected, EngineUnavailable
from ratchet.registry import Adapter, AdapterError, Staged
from serve.deps import OpsKey, Services, ServicesDep
from serve.errors import Conflict, InvalidRequest, scrub
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
    """Register a PEFT LoRA directory from under an import root (setting
    adapter_import_roots) as the new `candidate`, loading it into the engine."""
    settings = services.settings
    try:
        staged = await asyncio.to_thread(
            registry.stage_import,
            request.path,
            settings.import_roots,
            settings.adapters_dir,
            settings.adapter_max_bytes,
        )
    except AdapterError as exc:
        raise InvalidRequest(str(exc), param="path", code=exc.code) from exc
    try:
        rank = int(staged.config["r"])
        if rank > settings.engine_max_lora_rank:
            raise InvalidRequest(
                f"adapter rank {rank} is over the engine's max_lora_rank "
                f"{settings.engine_max_lora_rank}",
                param="path",
                code="invalid_adapter",
            )
        return await _register(staged, services)
    finally:
        await asyncio.to_thread(registry.discard, staged)


async def _register(staged: Staged, services: Services) -> Adapter:
    sha = staged.sha256
    name = registry.engine_name_for(sha)
    # Under the hash's lock, shared with other gateways and the CLI, until the row is
    # committed: whoever comes second sees the first one's row and never touches its
    # files.
    async with services.pool.connection() as conn, registry.locked(conn, sha):
        known = await registry.get_by_sha(conn, sha)
        if known is not None:
            raise Conflict(
                f"adapter {sha} is already registered (status {known.status}).",
                param="path",
                code="adapter_exists",
            )
        stored = await asyncio.to_thread(registry.publish, staged)
        engines = services.engines.reachable()
        try:
            if not engines:
                raise EngineUnavailable("no engine replica is reachable to load the adapter into")
            for engine in engines:
                await _load(engine, name, stored.path)
            adapter = await registry.register(
                conn, sha, stored.path, services.base_model_sha256, source="api"
            )
        except BaseException:
            # Not registered (the row goes with the transaction): leave no loaded
            # adapter behind, and no files, if this registration put them there.
            for engine in engines:
                with contextlib.suppress(Exception):
                    await engine.unload_adapter(name)
            await asyncio.to_thread(registry.unpublish, stored)
            raise
    services.router.invalidate()
    return adapter


async def _load(engine: EngineClient, name: str, stored: Path) -> None:
    try:
        await engine.load_adapter(name, str(stored))
    except EngineRejected as exc:
        if "already" not in exc.message:  # loaded by an earlier, failed attempt
            raise InvalidRequest(
                f"the engine refused the adapter: {scrub(exc.message, exc.url)}",
                param="path",
                code="invalid_adapter",
            ) from exc
