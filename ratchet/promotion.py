"""Switching production: promote and roll back.

The engine work comes first and holds no database lock or transaction: load the
adapter into every reachable replica and answer one greedy request through it,
each replica bounded by the engine's admin timeout. Only then, in one short
transaction under an advisory lock (waiting at most `lock_timeout_s` for it), the
state the decision was made on is checked again and production switches. So a hung
replica makes its own promotion fail in time, and never queues the promotions,
rollbacks and approvals behind it. Nothing is ever unloaded, so requests already
running on the old production finish normally.
"""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from pydantic import BaseModel

from ratchet import registry
from ratchet.engine import EngineClient, EngineError, EngineRejected, EngineTimeout
from ratchet.errors import RatchetError
from ratchet.hashing import adapter_sha256
from ratchet.registry import Adapter, AdapterError

_LOCK_ID = 0x50524F4D  # "PROM"
SMOKE_PROMPT = [{"role": "user", "content": "Say hello."}]
PROMOTABLE = ("passed", "awaiting_review")
# A connection for one short unit of work: `pool.connection`, or `single(conn)`.
Connect = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
AlsoInSwitch = Callable[[AsyncConnection], Awaitable[None]]


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


def single(conn: AsyncConnection) -> Connect:
    """`Connect` over one connection that the caller holds (a worker's)."""

    @asynccontextmanager
    async def use() -> AsyncIterator[AsyncConnection]:
        yield conn

    return use


async def promote(
    connect: Connect,
    engines: Sequence[EngineClient],
    adapter: Adapter,
    actor: str,
    *,
    force: bool = False,
    evaluation_id: int | None = None,
    reason: str = "",
    lock_timeout_s: float = 5.0,
    also: AlsoInSwitch | None = None,
) -> ProductionState:
    """Make `adapter` production. Refused (PromotionError) unless its evaluation passed
    against the current production, or `force` is given (recorded with what it
    overrode); refused always when its files are not intact. `also` runs in the
    switching transaction, after the switch (a review records itself there)."""
    async with connect() as conn, conn.transaction():
        decided_on = await latest(conn)
        _refuse_if_production(decided_on, adapter)
        problem = await gate_problem(conn, adapter, decided_on, evaluation_id)
    if problem is not None and not force:
        raise problem
    await make_ready(engines, adapter)
    async with connect() as conn, conn.transaction():
        current = await _lock(conn, lock_timeout_s)
        _unchanged(decided_on, current)
        if not force and (
            problem := await gate_problem(conn, adapter, current, evaluation_id, lock=True)
        ):
            raise problem
        state = await _insert(
            conn, "promote", adapter, _id(current), actor, force, reason, evaluation_id
        )
        await _set_status(conn, adapter, current.adapter if current else None)
        detail: dict[str, Any] = {
            "promotion_id": state.id,
            "evaluation_id": evaluation_id,
            "reason": reason,
        }
        if force and problem is not None:
            detail["overrode"] = problem.code
        await audit(conn, actor, "force_promote" if force else "promote", adapter.sha256, detail)
        if also is not None:
            await also(conn)
    return state


async def rollback(
    connect: Connect,
    engines: Sequence[EngineClient],
    actor: str,
    reason: str = "",
    lock_timeout_s: float = 5.0,
) -> ProductionState:
    """Restore the production state that the current one replaced."""
    async with connect() as conn, conn.transaction():
        decided_on = await latest(conn)
        if decided_on is None or (decided_on.previous_id is None and decided_on.adapter is None):
            raise PromotionError(
                "there is no previous production to roll back to", 409, "no_previous_production"
            )
        previous = await get_state(conn, decided_on.previous_id) if decided_on.previous_id else None
    target = previous.adapter if previous else None
    if target is not None:
        await make_ready(engines, target)
    async with connect() as conn, conn.transaction():
        current = await _lock(conn, lock_timeout_s)
        _unchanged(decided_on, current)
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
        await _set_status(conn, target, decided_on.adapter)
        await audit(
            conn,
            actor,
            "rollback",
            target.sha256 if target else "base",
            {"promotion_id": state.id, "from": _label(decided_on.adapter), "reason": reason},
        )
    return state


async def _lock(conn: AsyncConnection, lock_timeout_s: float) -> "ProductionState | None":
    """Take the switch lock (waiting `lock_timeout_s` at most); production as it is now."""
    await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
    try:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
    except psycopg.errors.LockNotAvailable as exc:
        raise PromotionError(
            "another promotion, rollback or review is switching production right now; "
            "try again in a moment",
            409,
            "production_busy",
        ) from exc
    return await latest(conn)


def _unchanged(decided_on: "ProductionState | None", current: "ProductionState | None") -> None:
    if _id(decided_on) != _id(current):
        raise PromotionError(
            "production changed while this request was loading the adapter "
            f"(now {_label(current.adapter if current else None)}); nothing was switched, "
            "look at the new state and try again",
            409,
            "production_changed",
        )


def _refuse_if_production(current: "ProductionState | None", adapter: Adapter) -> None:
    if current is not None and current.adapter and current.adapter.id == adapter.id:
        raise PromotionError(
            f"adapter {adapter.sha256} is production already", 409, "already_production"
        )


def _id(state: "ProductionState | None") -> int | None:
    return state.id if state else None


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
    """Intact files, loaded and answering on every engine: what production needs.
    The replicas are done concurrently, each within its engine's admin timeout."""
    await check_files(adapter)
    if not engines:
        raise PromotionError(
            "no engine replica is reachable to load and smoke-test the adapter; "
            "production is unchanged",
            503,
            "engine_unavailable",
        )
    results = await asyncio.gather(
        *(load_and_smoke_test(engine, adapter) for engine in engines), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result


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
    limit = engine.timeouts.admin
    try:
        async with asyncio.timeout(limit):
            listed = {m["id"] for m in await engine.models()}
            if adapter.engine_name not in listed:
                try:
                    await engine.load_adapter(adapter.engine_name, adapter.path)
                except EngineRejected as exc:
                    if "already" not in exc.message:
                        raise
            body = {
                "model": adapter.engine_name,
                "messages": SMOKE_PROMPT,
                "temperature": 0,
                "max_tokens": 8,
            }
            result = await engine.chat(body, f"smoke-{uuid.uuid4().hex[:12]}", timeout=limit)
    except (TimeoutError, EngineTimeout) as exc:
        raise PromotionError(
            f"smoke test of {adapter.engine_name} on {engine.base_url} got no answer within "
            f"{limit:g} s (the replica may be hung); production is unchanged",
            504,
            "engine_timeout",
        ) from exc
    except EngineError as exc:
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


async def gate_problem(
    conn: AsyncConnection,
    adapter: Adapter,
    current: "ProductionState | None",
    evaluation_id: int | None = None,
    lock: bool = False,
) -> PromotionError | None:
    """Why the gate does not let `adapter` through now, or None. The evaluation is
    `evaluation_id`, or the adapter's latest finished one; it must have passed, not be
    rejected, and have compared the adapter with the production that is current. With
    `lock`, a reviewer's reject waits for the switch (and then finds it production)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, decision, review, production_id FROM evaluations WHERE adapter_id = %s"
            " AND status = 'succeeded' AND (%s::bigint IS NULL OR id = %s)"
            " ORDER BY id DESC LIMIT 1" + (" FOR SHARE" if lock else ""),
            (adapter.id, evaluation_id, evaluation_id),
        )
        evaluation = await cur.fetchone()
    if evaluation is None:
        return PromotionError(
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
        return PromotionError(
            f"adapter {adapter.sha256} {what} (evaluation {evaluation['id']}); "
            "promote with force=true as ops to override",
            409,
            "gate_failed",
        )
    production = current.adapter if current else None
    if evaluation["production_id"] != (production.id if production else None):
        compared = await registry.get_by_id(conn, evaluation["production_id"])
        return PromotionError(
            f"evaluation {evaluation['id']} compared adapter {adapter.sha256} with "
            f"{_label(compared)}, but production is now {_label(production)}: the evidence "
            "is stale. Evaluate it again (POST /v1/admin/evaluations), or promote with "
            "force=true as ops",
            409,
            "evaluation_stale",
        )
    return None


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
