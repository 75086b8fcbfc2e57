"""A database of the feedback tests' own, emptied before each test."""

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from feedback.migrate import migrate

TABLES = (
    "pair_sources",
    "pairs",
    "kto_rows",
    "snapshots",
    "votes",
    "comparisons",
    "completions",
    "promotions",
    "adapters",
)


@pytest.fixture(scope="session")
def pairs_url(server_url: str) -> Iterator[str]:
    name = f"ratchet_pairs_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
    migrate(url)
    yield url
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def empty(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE " + ", ".join(TABLES) + " CASCADE")


@pytest.fixture
def db(pairs_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to an empty feedback database."""
    empty(pairs_url)
    with psycopg.connect(pairs_url, autocommit=True) as conn:
        yield conn
