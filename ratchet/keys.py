"""API keys: stored as sha256 only, each with one role.

Roles: `chat` (completions, votes, comparisons), `reviewer` (reads and decides
promotion reports), `ops` (admin endpoints; also allowed everywhere else).
"""

import hashlib
import secrets
import uuid
from datetime import datetime
from typing import Literal

from psycopg import AsyncConnection
from psycopg.rows import class_row
from pydantic import BaseModel

Role = Literal["chat", "reviewer", "ops"]
ROLES: tuple[Role, ...] = ("chat", "reviewer", "ops")
_PREFIX = "rk_"


class ApiKey(BaseModel):
    id: uuid.UUID
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None = None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_key(conn: AsyncConnection, role: Role, name: str = "") -> tuple[ApiKey, str]:
    """Create a key; the secret is returned once and never stored."""
    secret = _PREFIX + secrets.token_urlsafe(32)
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(
            "INSERT INTO api_keys (id, name, role, key_sha256) VALUES (%s, %s, %s, %s)"
            " RETURNING id, name, role, created_at, revoked_at",
            (uuid.uuid4(), name, role, hash_secret(secret)),
        )
        key = await cur.fetchone()
    assert key is not None
    return key, secret


async def find_active(conn: AsyncConnection, secret: str) -> ApiKey | None:
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(
            "SELECT id, name, role, created_at, revoked_at FROM api_keys"
            " WHERE key_sha256 = %s AND revoked_at IS NULL",
            (hash_secret(secret),),
        )
        return await cur.fetchone()


async def revoke(conn: AsyncConnection, key_id: uuid.UUID) -> bool:
    """Revoke a key; False when no active key has that id."""
    cur = await conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL",
        (key_id,),
    )
    return cur.rowcount == 1


async def list_keys(conn: AsyncConnection) -> list[ApiKey]:
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(
            "SELECT id, name, role, created_at, revoked_at FROM api_keys ORDER BY created_at"
        )
        return await cur.fetchall()
