"""API keys: stored as sha256 only, each with one role.

Roles: `chat` (completions, votes, comparisons), `reviewer` (reads and decides
promotion reports), `ops` (admin endpoints; also allowed everywhere else).

Scopes add to a role: `candidate` lets a chat key see and call the `candidate` model,
which nobody has evaluated yet (reviewer and ops keys always may). Quotas (`rpm`,
`tpm`, `concurrency`) live on the key; NULL means the settings' default.
"""

import hashlib
import secrets
import uuid
from datetime import datetime
from typing import Literal

from psycopg import AsyncConnection
from psycopg.rows import class_row
from pydantic import BaseModel, Field

Role = Literal["chat", "reviewer", "ops"]
ROLES: tuple[Role, ...] = ("chat", "reviewer", "ops")
Scope = Literal["candidate"]
SCOPES: tuple[Scope, ...] = ("candidate",)
_PREFIX = "rk_"
MAX_LIMIT = 2**31 - 1  # the columns are Postgres integers
_COLUMNS = "id, name, role, created_at, revoked_at, rpm, tpm, concurrency, scopes"


class ApiKey(BaseModel):
    id: uuid.UUID
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None = None
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    scopes: list[Scope] = []

    def may_call_candidate(self) -> bool:
        return self.role in ("reviewer", "ops") or "candidate" in self.scopes


class Limits(BaseModel):
    """A key's quotas as created; None: the settings' default."""

    rpm: int | None = Field(default=None, ge=1, le=MAX_LIMIT)
    tpm: int | None = Field(default=None, ge=1, le=MAX_LIMIT)
    concurrency: int | None = Field(default=None, ge=1, le=MAX_LIMIT)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_key(
    conn: AsyncConnection,
    role: Role,
    name: str = "",
    limits: Limits | None = None,
    scopes: tuple[Scope, ...] = (),
) -> tuple[ApiKey, str]:
    """Create a key; the secret is returned once and never stored."""
    secret = _PREFIX + secrets.token_urlsafe(32)
    limits = limits or Limits()
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(
            "INSERT INTO api_keys (id, name, role, key_sha256, rpm, tpm, concurrency, scopes)"
            f" VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
            (
                uuid.uuid4(),
                name,
                role,
                hash_secret(secret),
                limits.rpm,
                limits.tpm,
                limits.concurrency,
                list(scopes),
            ),
        )
        key = await cur.fetchone()
    assert key is not None
    return key, secret


async def find_active(conn: AsyncConnection, secret: str) -> ApiKey | None:
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM api_keys WHERE key_sha256 = %s AND revoked_at IS NULL",
            (hash_secret(secret),),
        )
        return await cur.fetchone()


async def is_active(conn: AsyncConnection, key_id: uuid.UUID) -> bool:
    cur = await conn.execute(
        "SELECT 1 FROM api_keys WHERE id = %s AND revoked_at IS NULL", (key_id,)
    )
    return await cur.fetchone() is not None


async def revoke(conn: AsyncConnection, key_id: uuid.UUID) -> bool:
    """Revoke a key; False when no active key has that id."""
    cur = await conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL",
        (key_id,),
    )
    return cur.rowcount == 1


async def list_keys(conn: AsyncConnection) -> list[ApiKey]:
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at")
        return await cur.fetchall()
