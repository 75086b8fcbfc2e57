"""What every `ratchet` subcommand shares: settings, errors on stderr, a migrated DB."""

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import typer
from rich.console import Console

from ratchet.db import database_url
from ratchet.errors import RatchetError
from ratchet.settings import Settings

T = TypeVar("T")
err = Console(stderr=True)


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:  # pydantic's ValidationError
        err.print(f"[red]Invalid settings:[/red] {exc}")
        raise typer.Exit(2) from exc


@contextmanager
def migrated_database(settings: Settings) -> Iterator[str]:
    """The database's conninfo (embedded if needed), migrated; errors exit with 1."""
    from ratchet.migrate import migrate

    try:
        with database_url(settings) as url:
            migrate(url)
            yield url
    except RatchetError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc


def with_db(settings: Settings, work: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
    """Run `work` in one transaction on a migrated database."""

    async def run(url: str) -> T:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            return await work(conn)

    with migrated_database(settings) as url:
        return asyncio.run(run(url))
