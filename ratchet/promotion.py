"""Switching production: promote, roll back, and a reviewer's decision on a report.

Each runs in one transaction under an advisory lock, so two of them never interleave.
The engine work comes first (load the adapter into every engine, answer one greedy
request through it); production switches only if all of that worked. Nothing is ever
unloaded, so requests already running on the old production finish normally.
"""

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from pydantic import BaseModel

from ratchet import registry
from ratchet.errors import RatchetError
from ratchet.hashing import adapter_sha256
from ratchet.registry import Adapter, AdapterError
from serve.engine import EngineClient
from serve.errors import EngineError, EngineUnavailable

_LOCK_ID = 0x50524F4D  # "PROM"
SMOKE_PROMPT = [{"role": "user", "content": "Say hello."}]
PROMOTABLE = ("passed", "awaiting_review")


class PromotionError(RatchetError):
    """A promotion, rollback or review is refused and nothing changed. `status` is the
    HTTP status to answer with, `code` a stable machine-readable reason."""

    def __init__(self, message: str, status: int = 409, code: str = "promotion_refused") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class ProductionState(BaseModel):
    """One row of `promotions`: production from then on (adapter None = the base)."""

    id: int
    kind: str
    adapter: Adapter | None
    previous_id: int | None
    actor: str
    forced: bool
    reason: str
    evaluation_id: int | None


async def promote(
    conn: AsyncConnection,
    engines: Sequence[EngineClient],
    adapter: Adapter,
    actor: str,
    *,
    force: bool = False,
    evaluation_id: int | None = None,
    reason: str = "",
) -> ProductionState:
    """Make `adapter` production. Refused (PromotionError) unless it passed the gate,
    or `force` is given (recorded); refused always when its files are not intact."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        current = await latest(conn)
        if current is not None and current.adapter and current.adapter.id == adapter.id:
            raise PromotionError(
                f"adapter {adapter.sha256} is production already", 409, "already_production"
            )
        if not force:
            await _check_gate(conn, adapter)
        await make_ready(engines, adapter)
        state = await _insert(
            conn,
            "promote",
            adapter,
            current.id if current else None,
            actor,
            force,
            reason,
            evaluation_id,
        )
        await _set_status(conn, adapter, current.adapter if current else None)
        await audit(
            conn,
            actor,
            "force_promote" if force else "promote",
            adapter.sha256,
            {"promotion_id": state.id, "evaluation_id": evaluation_id, "reason": reason},
        )
    return state


async def rollback(
    conn: AsyncConnection, engines: Sequence[EngineClient], actor: str, reason: str = ""
) -> ProductionState:
    """Restore the production state that the current one replaced."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        current = await latest(conn)
        if current is None or (current.previous_id is None and current.adapter is None):
            raise PromotionError(
                "there is no previous production to roll back to", 409, "no_previous_production"
            )
        previous = await get_state(conn, current.previous_id) if current.previous_id else None
        target = previous.adapter if previous else None
        if target is not None:
            await make_ready(engines, target)
        state = await _insert(
            conn,
            "rollback",
            target,
            previous.previous_id if previous else None,
            actor,
            False,
            reason,
            None,
        )
        await _set_status(conn, target, current.adapter)
        await audit(
            conn,
            actor,
            "rollback",
            target.sha256 if target else "base",
            {"promotion_id": state.id, "from": _label(current.adapter), "reason": reason},
        )
    return state


async def latest(conn: AsyncConnection) -> ProductionState | None:
    return await _state(conn, "ORDER BY id DESC LIMIT 1", ())


async def get_state(conn: AsyncConnection, state_id: int) -> ProductionState | None:
    return await _state(conn, "WHERE id = %s", (state_id,))


async def history(conn: AsyncConnection, limit: int = 50) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT p.id, p.kind, p.at, p.actor, p.forced, p.reason, p.evaluation_id,"
            " p.previous_id, a.sha256, a.engine_name FROM promotions p"
            " LEFT JOIN adapters a ON a.id = p.to_adapter_id ORDER BY p.id DESC LIMIT %s",
            (limit,),
        )
        return await cur.fetchall()


async def make_ready(engines: Sequence[EngineClient], adapter: Adapter) -> None:
    """Intact files, loaded and answering on every engine: what production needs."""
    await check_files(adapter)
    if not engines:
        raise PromotionError(
            "no engine replica is reachable to load and smoke-test the adapter; "
            "production is unchanged",
            503,
            "engine_unavailable",
        )
    for engine in engines:
        await load_and_smoke_test(engine, adapter)


async def check_files(adapter: Adapter) -> None:
    """The adapter's files are present and hash to what was registered."""
    path = Path(adapter.path)
    try:
        registry.check_adapter_dir(path)
    except AdapterError as exc:
        raise PromotionError(
            f"adapter {adapter.sha256}: {exc}", 409, "adapter_files_missing"
        ) from exc
    actual = adapter_sha256(path)
    if actual != adapter.sha256:
        raise PromotionError(
            f"adapter {adapter.sha256}: its files at {path} now hash to {actual}; "
            "they were changed after registration",
            409,
            "adapter_hash_mismatch",
        )


async def load_and_smoke_test(engine: EngineClient, adapter: Adapter) -> None:
    """Load the adapter (if needed) and get one greedy answer through it."""
    try:
        listed = {m["id"] for m in await engine.models()}
        if adapter.engine_name not in listed:
            try:
                await engine.load_adapter(adapter.engine_name, adapter.path)
            except EngineError as exc:
                if "already" not in exc.message:
                    raise
        body = {
            "model": adapter.engine_name,
            "messages": SMOKE_PROMPT,
            "temperature": 0,
            "max_tokens": 8,
        }
        result = await engine.chat(body, f"smoke-{uuid.uuid4().hex[:12]}")
    except (EngineError, EngineUnavailable) as exc:
        raise PromotionError(
            f"smoke test of {adapter.engine_name} on {engine.base_url} failed: {exc}; "
            "production is unchanged",
            502,
            "smoke_test_failed",
        ) from exc
    if not result.get("choices"):
        raise PromotionError(
            f"smoke test of {adapter.engine_name}: no answer", 502, "smoke_test_failed"
        )


async def audit(
    conn: AsyncConnection, actor: str, action: str, subject: str, detail: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO audit (actor, action, subject, detail) VALUES (%s, %s, %s, %s)",
        (actor, action, subject, json.dumps(detail, default=str)),
    )


async def _check_gate(conn: AsyncConnection, adapter: Adapter) -> None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, decision, review FROM evaluations WHERE adapter_id = %s"
            " AND status = 'succeeded' ORDER BY id DESC LIMIT 1",
            (adapter.id,),
        )
        evaluation = await cur.fetchone()
    if evaluation is None:
        raise PromotionError(
            f"adapter {adapter.sha256} has not passed an evaluation; run one first "
            "(POST /v1/admin/evaluations), or promote with force=true as ops",
            409,
            "not_evaluated",
        )
    if evaluation["decision"] != "pass" or evaluation["review"] == "rejected":
        what = (
            "was rejected by a reviewer"
            if evaluation["review"] == "rejected"
            else ("failed the gate")
        )
        raise PromotionError(
            f"adapter {adapter.sha256} {what} (evaluation {evaluation['id']}); "
            "promote with force=true as ops to override",
            409,
            "gate_failed",
        )


async def _insert(
    conn: AsyncConnection,
    kind: str,
    adapter: Adapter | None,
    previous_id: int | None,
    actor: str,
    forced: bool,
    reason: str,
    evaluation_id: int | None,
) -> ProductionState:
    async with conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO promotions (from_adapter_id, to_adapter_id, actor, reason, kind, forced,"
            " evaluation_id, previous_id) VALUES ((SELECT to_adapter_id FROM promotions"
            " ORDER BY id DESC LIMIT 1), %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (
                adapter.id if adapter else None,
                actor,
                reason,
                kind,
                forced,
                evaluation_id,
                previous_id,
            ),
        )
        row = await cur.fetchone()
    assert row is not None
    state = await get_state(conn, int(row[0]))
    assert state is not None
    return state


async def _set_status(conn: AsyncConnection, new: Adapter | None, old: Adapter | None) -> None:
    if old is not None:
        await conn.execute("UPDATE adapters SET status = 'retired' WHERE id = %s", (old.id,))
    if new is not None:
        await conn.execute("UPDATE adapters SET status = 'production' WHERE id = %s", (new.id,))


async def _state(
    conn: AsyncConnection, where: str, params: tuple[Any, ...]
) -> ProductionState | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, kind, to_adapter_id, previous_id, actor, forced, reason, evaluation_id"
            f" FROM promotions {where}",
            params,
        )
        row = await cur.fetchone()
    if row is None:
        return None
    adapter = await registry.get_by_id(conn, row.pop("to_adapter_id"))
    return ProductionState(adapter=adapter, **row)


def _label(adapter: Adapter | None) -> str:
    return adapter.sha256 if adapter else "base"
