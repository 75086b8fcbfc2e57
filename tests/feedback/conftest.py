"""A database of the feedback tests' own, emptied before each test."""

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.helpers import fresh_database

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
    with fresh_database(server_url, "ratchet_pairs") as url:
        yield url


def empty(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE " + ", ".join(TABLES) + " CASCADE")


@pytest.fixture
def db(pairs_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to an empty feedback database."""
    empty(pairs_url)
    with psycopg.connect(pairs_url, autocommit=True) as conn:
        yield conn
