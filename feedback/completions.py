"""The answer log: one row per answer the gateway gave, with its full provenance."""

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field

from feedback.prompts import prompt_sha256

__all__ = [
    "Completion",
    "CompletionRecord",
    "finish",
    "get",
    "insert",
    "prompt_sha256",
    "sweep_streams",
]

CompletionStatus = Literal["streaming", "complete", "aborted"]


class CompletionRecord(BaseModel):
    """What the gateway knows about an answer; `output` and the counts come at the end."""

    id: uuid.UUID
    key_id: uuid.UUID | None
    end_user: str | None
    public_model: str
    engine_model: str
    adapter_id: uuid.UUID | None
    adapter_sha256: str | None
    base_model_sha256: str | None
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    prompt_sha256: str
    stream: bool
    status: CompletionStatus = "complete"
    output: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    engine_url: str | None = None  # which replica answered
    gateway_id: uuid.UUID | None = None  # which gateway process holds a stream
    # The gateway's clock: a row written late (from the spool) keeps its real time.
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class Completion(CompletionRecord):
    pass


_FIELDS = list(CompletionRecord.model_fields)
# Idempotent: a write replayed from the spool may have reached the database before.
_INSERT = (
    f"INSERT INTO completions ({', '.join(_FIELDS)}) VALUES ({', '.join(['%s'] * len(_FIELDS))})"
    " ON CONFLICT (id) DO NOTHING"
)


def _values(record: CompletionRecord) -> list[Any]:
    values = [getattr(record, name) for name in _FIELDS]
    values[_FIELDS.index("messages")] = Jsonb(record.messages)
    values[_FIELDS.index("params")] = Jsonb(record.params)
    return values


async def insert(conn: AsyncConnection, record: CompletionRecord) -> None:
    await conn.execute(_INSERT, _values(record))


async def finish(
    conn: AsyncConnection,
    completion_id: uuid.UUID,
    *,
    status: CompletionStatus,
    output: str,
    finish_reason: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    latency_ms: float,
) -> None:
    """Complete a row inserted with status 'streaming'."""
    await conn.execute(
        "UPDATE completions SET status = %s, output = %s, finish_reason = %s,"
        " prompt_tokens = %s, completion_tokens = %s, latency_ms = %s WHERE id = %s",
        (
            status,
            output,
            finish_reason,
            prompt_tokens,
            completion_tokens,
            latency_ms,
            completion_id,
        ),
    )


async def get(conn: AsyncConnection, completion_id: uuid.UUID) -> Completion | None:
    async with conn.cursor(row_factory=class_row(Completion)) as cur:
        await cur.execute(
            f"SELECT {', '.join(_FIELDS)} FROM completions WHERE id = %s",
            (completion_id,),
        )
        return await cur.fetchone()


async def sweep_streams(conn: AsyncConnection, gateway_ids: list[uuid.UUID]) -> int:
    """Mark the streams of gateways that are gone `aborted`; returns how many."""
    if not gateway_ids:
        return 0
    cur = await conn.execute(
        "UPDATE completions SET status = 'aborted', output = coalesce(output, '')"
        " WHERE status = 'streaming' AND gateway_id = ANY(%s)",
        (gateway_ids,),
    )
    return cur.rowcount
