"""Reviewers' browser sessions for the report pages (table `report_sessions`).

A session id is random and handed to the browser once, in a cookie; the database keeps
only its sha256, so a copy of the table signs nobody in. A session ends at its expiry,
after `idle_s` without use, at logout, or when its key is revoked (checked on every
use, by joining `api_keys`). Each session has its own CSRF token for the page's forms.
"""

import hashlib
import secrets
import uuid
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from pydantic import BaseModel

from ratchet.keys import ApiKey

# `last_used_at` is written at most this often: a reviewer reading a report does not
# cost a write per page view. The idle check is that much stricter, never looser.
TOUCH_EVERY_S = 60.0
_KEY_COLUMNS = ", ".join(f"k.{name}" for name in ApiKey.model_fields)


class Session(BaseModel):
    """A live session: whose it is and the token its forms must carry."""

    key: ApiKey
    csrf_token: str


def digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


async def start(conn: AsyncConnection, key_id: uuid.UUID, ttl_s: float) -> tuple[str, str]:
    """Open a session for a key; return (session id, CSRF token). The id is not stored."""
    session_id = secrets.token_urlsafe(32)
    csrf_token = secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO report_sessions (id_sha256, key_id, csrf_token, expires_at)"
        " VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
        (digest(session_id), key_id, csrf_token, ttl_s),
    )
    return session_id, csrf_token


async def find(conn: AsyncConnection, session_id: str, idle_s: float) -> Session | None:
    """The live session with this id, or None (unknown, ended, expired, idle, or its
    key revoked). Marks it used, at most once every TOUCH_EVERY_S."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT s.csrf_token, {_KEY_COLUMNS},"
            " s.last_used_at < now() - make_interval(secs => %s) AS touch"
            " FROM report_sessions s JOIN api_keys k ON k.id = s.key_id"
            " WHERE s.id_sha256 = %s AND s.ended_at IS NULL AND s.expires_at > now()"
            " AND s.last_used_at > now() - make_interval(secs => %s)"
            " AND k.revoked_at IS NULL",
            (TOUCH_EVERY_S, digest(session_id), idle_s),
        )
        row: dict[str, Any] | None = await cur.fetchone()
    if row is None:
        return None
    if row.pop("touch"):
        await conn.execute(
            "UPDATE report_sessions SET last_used_at = now() WHERE id_sha256 = %s",
            (digest(session_id),),
        )
    csrf_token = row.pop("csrf_token")
    return Session(key=ApiKey.model_validate(row), csrf_token=csrf_token)


async def end(conn: AsyncConnection, session_id: str) -> bool:
    """End a session (logout); False when it had already ended."""
    cur = await conn.execute(
        "UPDATE report_sessions SET ended_at = now() WHERE id_sha256 = %s AND ended_at IS NULL",
        (digest(session_id),),
    )
    return cur.rowcount == 1
