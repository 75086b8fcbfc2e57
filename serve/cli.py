"""`ratchet report ID`: a promotion report as Markdown, JSON or an HTML page."""

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Literal

import psycopg
import typer

from ratchet import evaluations
from ratchet.cli_support import err, load_settings, migrated_database
from serve import render


def report(
    evaluation_id: Annotated[int, typer.Argument(help="The evaluation (report) id.")],
    format: Annotated[
        Literal["md", "json", "html"], typer.Option("--format", "-f", help="md, json or html.")
    ] = "md",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to a file.")] = None,
) -> None:
    """Print a promotion report as Markdown, JSON or a standalone HTML page."""
    settings = load_settings()

    async def fetch(url: str) -> evaluations.Evaluation | None:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            return await evaluations.get(conn, evaluation_id)

    with migrated_database(settings) as url:
        evaluation = asyncio.run(fetch(url))
    if evaluation is None:
        err.print(f"[red]No evaluation with id {evaluation_id}.[/red]")
        raise typer.Exit(1)
    found = evaluations.report_of(evaluation)
    if found is None:
        err.print(
            f"[yellow]Evaluation {evaluation_id} is {evaluation.status}"
            f"{': ' + evaluation.error if evaluation.error else ''}; no report yet.[/yellow]"
        )
        raise typer.Exit(1)
    text = render.render(found, format)
    if output:
        output.write_text(text)
        err.print(f"wrote {output}")
    else:
        sys.stdout.write(text)
