"""Secrets every gateway shares, made once and kept in the database (`server_secrets`).

The first gateway to ask creates a random value; the INSERT ... ON CONFLICT DO
NOTHING then SELECT means concurrent first starts all end up with the same one."""

import secrets

from psycopg import AsyncConnection

FEEDBACK_TOKENS = "feedback_tokens"


async def get_or_create(conn: AsyncConnection, name: str, nbytes: int = 32) -> bytes:
    await conn.execute(
        "INSERT INTO server_secrets (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
        (name, secrets.token_bytes(nbytes)),
    )
    cur = await conn.execute("SELECT value FROM server_secrets WHERE name = %s", (name,))
    row = await cur.fetchone()
    assert row is not None
    return bytes(row[0])
