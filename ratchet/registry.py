"""The adapter registry: which LoRA adapters exist, and which is production.

Adapters are content-addressed. Their files live in `adapters/<sha256>/`, and the
name they are loaded under in vLLM is derived from that hash, so a new adapter can
never be confused with an old one. Production is the target of the latest row of
the append-only `promotions` table (none, or a NULL target, means the base model).
"""

import json
import os
import shutil
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.rows import class_row
from pydantic import BaseModel

from ratchet.errors import RatchetError
from ratchet.hashing import adapter_sha256

AdapterStatus = Literal[
    "candidate", "evaluating", "rejected", "passed", "awaiting_review", "production", "retired"
]
# Statuses of an adapter still on its way to production; the newest is "candidate".
CANDIDATE_STATUSES = ("candidate", "evaluating", "passed", "awaiting_review")
# Written beside every trained adapter: where it came from (see trainer/artifacts.py).
TRAINING_CARD = "training-card.json"
_COLUMNS = "id, sha256, engine_name, path, base_model_sha256, status, source, created_at"


class AdapterError(RatchetError):
    """An adapter directory is unusable, or the registry refuses it."""


class Adapter(BaseModel):
    id: uuid.UUID
    sha256: str
    engine_name: str
    path: str
    base_model_sha256: str | None
    status: AdapterStatus
    source: str
    created_at: datetime


def engine_name_for(sha256: str) -> str:
    return f"ratchet-{sha256[:16]}"


def check_adapter_dir(path: Path) -> dict[str, Any]:
    """Return the adapter's PEFT config, or raise AdapterError saying what is missing."""
    config_file = path / "adapter_config.json"
    if not path.is_dir() or not config_file.is_file():
        raise AdapterError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    if not any(path.glob("adapter_model.*")):
        raise AdapterError(f"{path} has no adapter_model.safetensors")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise AdapterError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file} must hold a JSON object")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterError(f"{config_file}: 'r' (the LoRA rank) must be a positive integer")
    return config


def store_files(source: Path, adapters_dir: Path) -> tuple[str, Path]:
    """Copy an adapter into `adapters_dir/<sha256>/` atomically; return (sha256, path).

    The copy goes to a temporary directory beside the target and is renamed into
    place, so a crash never leaves a half-written adapter under its hash.
    """
    check_adapter_dir(source)
    sha = adapter_sha256(source)
    target = adapters_dir / sha
    if target.is_dir() and adapter_sha256(target) == sha:
        return sha, target
    adapters_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=adapters_dir))
    try:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        if target.exists():
            shutil.rmtree(target)  # a damaged copy under this hash
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sha, target


async def register(
    conn: AsyncConnection,
    sha256: str,
    path: Path,
    base_model_sha256: str | None,
    status: AdapterStatus = "candidate",
    source: str = "manual",
    run_id: int | None = None,
    snapshot_id: int | None = None,
) -> Adapter:
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(
            "INSERT INTO adapters"
            " (id, sha256, engine_name, path, base_model_sha256, status, source, run_id,"
            f" snapshot_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
            (
                uuid.uuid4(),
                sha256,
                engine_name_for(sha256),
                str(path),
                base_model_sha256,
                status,
                source,
                run_id,
                snapshot_id,
            ),
        )
        adapter = await cur.fetchone()
    assert adapter is not None
    return adapter


async def get_by_sha(conn: AsyncConnection, sha256: str) -> Adapter | None:
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(f"SELECT {_COLUMNS} FROM adapters WHERE sha256 = %s", (sha256,))
        return await cur.fetchone()


async def get_by_id(conn: AsyncConnection, adapter_id: uuid.UUID | None) -> Adapter | None:
    if adapter_id is None:
        return None
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(f"SELECT {_COLUMNS} FROM adapters WHERE id = %s", (adapter_id,))
        return await cur.fetchone()


async def find(conn: AsyncConnection, ref: str) -> Adapter | None:
    """An adapter by id, sha256 (or a unique prefix of 8+ hex digits) or engine name."""
    ref = ref.strip()
    try:
        return await get_by_id(conn, uuid.UUID(ref))
    except ValueError:
        pass
    if ref.startswith("ratchet-"):
        ref = ref.removeprefix("ratchet-")
    if len(ref) < 8 or any(c not in "0123456789abcdef" for c in ref):
        return None
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM adapters WHERE sha256 LIKE %s LIMIT 2", (ref + "%",)
        )
        found = await cur.fetchall()
    return found[0] if len(found) == 1 else None


async def set_status(conn: AsyncConnection, adapter_id: uuid.UUID, status: AdapterStatus) -> None:
    await conn.execute("UPDATE adapters SET status = %s WHERE id = %s", (status, adapter_id))


async def list_adapters(conn: AsyncConnection) -> list[Adapter]:
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(f"SELECT {_COLUMNS} FROM adapters ORDER BY created_at DESC")
        return await cur.fetchall()


async def production(conn: AsyncConnection) -> Adapter | None:
    """The adapter behind `production`, or None when production is the base model."""
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(
            f"SELECT {', '.join('a.' + c for c in _COLUMNS.split(', '))}"
            " FROM (SELECT to_adapter_id FROM promotions ORDER BY id DESC LIMIT 1) p"
            " JOIN adapters a ON a.id = p.to_adapter_id"
        )
        return await cur.fetchone()


async def candidate(conn: AsyncConnection) -> Adapter | None:
    """The newest adapter still on its way to production, if any."""
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM adapters WHERE status = ANY(%s)"
            " ORDER BY created_at DESC LIMIT 1",
            (list(CANDIDATE_STATUSES),),
        )
        return await cur.fetchone()
