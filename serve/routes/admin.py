import asyncio
import shutil
from pathlib import Path

from fastapi import APIRouter

from ratchet import registry
from ratchet.registry import Adapter, AdapterError
from serve.deps import OpsKey, ServicesDep
from serve.errors import Conflict, EngineError, InvalidRequest
from serve.protocol import AdapterRegisterRequest

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/adapters")
async def list_adapters(_: OpsKey, services: ServicesDep) -> list[Adapter]:
    """Every registered adapter, newest first."""
    async with services.pool.connection() as conn:
        return await registry.list_adapters(conn)


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
    rank = int(str(config.get("r", 0)))
    if rank > services.settings.engine_max_lora_rank:
        raise InvalidRequest(
            f"adapter rank {rank} is over the engine's max_lora_rank "
            f"{services.settings.engine_max_lora_rank}",
            param="path",
            code="invalid_adapter",
        )
    adapters_dir = services.settings.adapters_dir
    existed_before = {p.name for p in adapters_dir.iterdir()} if adapters_dir.is_dir() else set()
    sha, stored = await asyncio.to_thread(registry.store_files, source, adapters_dir)
    async with services.pool.connection() as conn:
        known = await registry.get_by_sha(conn, sha)
    if known is not None:
        raise Conflict(
            f"adapter {sha} is already registered (status {known.status}).",
            param="path",
            code="adapter_exists",
        )
    try:
        await services.engine.load_adapter(registry.engine_name_for(sha), str(stored))
        async with services.pool.connection() as conn:
            adapter = await registry.register(
                conn, sha, stored, services.base_model_sha256, source="api"
            )
    except BaseException as exc:
        if sha not in existed_before:  # leave no files behind for a refused adapter
            shutil.rmtree(stored, ignore_errors=True)
        if isinstance(exc, EngineError):
            raise InvalidRequest(
                f"the engine refused the adapter: {exc.message}",
                param="path",
                code="invalid_adapter",
            ) from exc
        raise
    services.router.invalidate()
    return adapter
