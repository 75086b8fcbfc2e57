"""Migrations apply once, in order, and concurrent callers do not collide."""

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from psycopg import sql

from ratchet.migrate import available, migrate
from tests.helpers import query


@pytest.fixture
def empty_database(server_url: str) -> Iterator[str]:
    name = f"ratchet_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield psycopg.conninfo.make_conninfo(server_url, dbname=name)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_versions_are_contiguous() -> None:
    versions = [m.version for m in available()]
    assert versions == list(range(1, len(versions) + 1))


def test_concurrent_migrations_apply_each_version_once(empty_database: str) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: migrate(empty_database), range(4)))
    assert sorted(len(r) for r in results) == [0, 0, 0, len(available())]
    rows = query(empty_database, "SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in rows] == [m.version for m in available()]
    assert migrate(empty_database) == []


def test_votes_cast_by_another_key_before_migration_10_are_set_aside(
    empty_database: str,
) -> None:
    """Before migration 10 any key could vote on any answer: such votes leave `votes`
    (and so every future snapshot) for `votes_quarantine`; the answer's own key's
    votes and ops votes stay."""
    with psycopg.connect(empty_database) as conn, conn.transaction():
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in [m for m in available() if m.version < 10]:
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
        owner, other, ops = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        for key, role in ((owner, "chat"), (other, "chat"), (ops, "ops")):
            conn.execute(
                "INSERT INTO api_keys (id, role, key_sha256) VALUES (%s, %s, %s)",
                (key, role, key.hex),
            )
        answer = uuid.uuid4()
        conn.execute(
            "INSERT INTO completions (id, key_id, public_model, engine_model, messages,"
            " params, prompt_sha256, stream, status) VALUES (%s, %s, 'production', 'm', '[]', '{}',"
            " 'p', false, 'complete')",
            (answer, owner),
        )
        for key, user in ((owner, ""), (other, "u1"), (other, "u2"), (ops, "support")):
            conn.execute(
                "INSERT INTO votes (completion_id, end_user, key_id, rating)"
                " VALUES (%s, %s, %s, 1)",
                (answer, user, key),
            )
    assert [m.version for m in migrate(empty_database)] == [
        m.version for m in available() if m.version >= 10
    ]
    kept = query(empty_database, "SELECT key_id FROM votes ORDER BY id")
    assert [r["key_id"] for r in kept] == [owner, ops]
    aside = query(empty_database, "SELECT key_id, end_user, reason FROM votes_quarantine")
    assert sorted((r["key_id"], r["end_user"]) for r in aside) == [(other, "u1"), (other, "u2")]
    assert {r["reason"] for r in aside} == {"not_the_answers_key"}
