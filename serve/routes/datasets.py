import asyncio
from typing import Any

import psycopg
from fastapi import APIRouter

from feedback.pairs import snapshots
from feedback.pairs.snapshots import Snapshot
from feedback.pairs.stats import DatasetStats, stats
from serve.deps import OpsKey, RowId, ServicesDep
from serve.errors import NotFound

router = APIRouter(prefix="/v1/admin/datasets", tags=["datasets"])


@router.get("")
async def list_datasets(_: OpsKey, services: ServicesDep) -> dict[str, Any]:
    """Snapshots, newest first, and what a build would yield now (`ratchet data stats`)."""
    settings = services.settings
    conninfo = services.conninfo
    # The builder is synchronous and set-based; run its dry run off the event loop.
    current: DatasetStats = await asyncio.to_thread(stats, conninfo, settings.pairs)
    found = await asyncio.to_thread(_list, conninfo)
    return {
        "object": "list",
        "stats": current.model_dump(mode="json"),
        "data": [s.model_dump(mode="json") for s in found],
    }


@router.get("/{snapshot_id}")
async def get_dataset(snapshot_id: RowId, _: OpsKey, services: ServicesDep) -> Snapshot:
    """One snapshot: counts per rule and split, drop reasons, settings, hashes, files."""
    found = await asyncio.to_thread(_get, services.conninfo, snapshot_id)
    if found is None:
        raise NotFound(f"No snapshot with id {snapshot_id}.", param="id", code="snapshot_not_found")
    return found


def _list(conninfo: str) -> list[Snapshot]:
    with psycopg.connect(conninfo) as conn:
        return snapshots.list_all(conn)


def _get(conninfo: str, snapshot_id: int) -> Snapshot | None:
    with psycopg.connect(conninfo) as conn:
        return snapshots.get(conn, snapshot_id)
