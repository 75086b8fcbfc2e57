"""Hand-built answers, votes and comparisons, written straight to Postgres."""

import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from feedback.prompts import prompt_sha256

LONG = " with enough words in it to pass the length filter easily"


def messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]


def answer(
    conn: psycopg.Connection[Any],
    question: str,
    text: str,
    *,
    tokens: int = 20,
    prompt_tokens: int = 30,
    adapter_id: uuid.UUID | None = None,
    status: str = "complete",
    msgs: list[dict[str, Any]] | None = None,
) -> uuid.UUID:
    uid = uuid.uuid4()
    conv = msgs or messages(question)
    conn.execute(
        "INSERT INTO completions (id, public_model, engine_model, adapter_id, messages, params,"
        " prompt_sha256, stream, status, output, finish_reason, prompt_tokens,"
        " completion_tokens, latency_ms)"
        " VALUES (%s, 'production', 'base', %s, %s, '{}', %s, false, %s, %s, 'stop', %s, %s, 1)",
        (uid, adapter_id, Jsonb(conv), prompt_sha256(conv), status, text, prompt_tokens, tokens),
    )
    return uid


def vote(
    conn: psycopg.Connection[Any],
    completion: uuid.UUID,
    rating: int,
    user: str = "u",
    correction: str | None = None,
) -> int:
    row = conn.execute(
        "INSERT INTO votes (completion_id, end_user, rating, correction) VALUES (%s, %s, %s, %s)"
        " RETURNING id",
        (completion, user, rating, correction),
    ).fetchone()
    assert row is not None
    return int(row[0])


def comparison(
    conn: psycopg.Connection[Any], a: uuid.UUID, b: uuid.UUID, choice: str | None
) -> uuid.UUID:
    uid = uuid.uuid4()
    conn.execute(
        "INSERT INTO comparisons (id, messages, params, completion_a, completion_b, choice,"
        " decided_at) VALUES (%s, '[]', '{}', %s, %s, %s, CASE WHEN %s::text IS NULL THEN NULL"
        " ELSE now() END)",
        (uid, a, b, choice, choice),
    )
    return uid


def adapter(conn: psycopg.Connection[Any], promote: bool = False) -> uuid.UUID:
    uid = uuid.uuid4()
    sha = uuid.uuid4().hex * 2
    conn.execute(
        "INSERT INTO adapters (id, sha256, engine_name, path, status)"
        " VALUES (%s, %s, %s, '/x', 'candidate')",
        (uid, sha, "ratchet-" + sha[:16]),
    )
    if promote:
        conn.execute("INSERT INTO promotions (to_adapter_id, actor) VALUES (%s, 'test')", (uid,))
    return uid
