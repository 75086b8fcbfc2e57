"""`ratchet eval ADAPTER` (an evaluation in the foreground) and `ratchet report ID`."""

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Literal

import psycopg
import typer
from rich.progress import BarColumn, Progress, TimeElapsedColumn

from eval import render, store
from eval.errors import EvalError
from ratchet import registry
from ratchet.cli_support import err, load_settings, migrated_database
from ratchet.settings import Settings


def evaluate(
    adapter: Annotated[str, typer.Argument(help="Adapter id, sha256 (prefix) or engine name.")],
) -> None:
    """Evaluate an adapter against production now, with progress; print the decision.

    The last line of output is the evaluation's JSON summary (id, decision, report URL).
    """
    from eval.run import evaluate as run

    settings = load_settings()
    with migrated_database(settings) as url:
        try:
            evaluation = asyncio.run(_evaluate(settings, url, adapter, run))
        except EvalError as exc:
            err.print(f"[red]Evaluation failed:[/red] {exc}")
            raise typer.Exit(1) from exc
    report = store.report_of(evaluation)
    assert report is not None
    for criterion in report.decision.criteria:
        mark = "[green]✔[/green]" if criterion.passed else "[red]✘[/red]"
        err.print(f"{mark} {criterion.name}: {criterion.detail}")
    summary = {
        "evaluation_id": evaluation.id,
        "decision": evaluation.decision,
        "reasons": evaluation.reasons,
        "report_url": f"/reports/{evaluation.id}",
    }
    import json

    print(json.dumps(summary))


async def _evaluate(settings: Settings, url: str, ref: str, run):  # type: ignore[no-untyped-def]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        adapter = await registry.find(conn, ref)
        if adapter is None:
            raise EvalError(f"no adapter matches {ref!r} (see `ratchet adapters list`)")
        evaluation = await store.create(conn, adapter.id, "cli")
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            "{task.percentage:>3.0f}%",
            TimeElapsedColumn(),
            console=err,
        ) as bar:
            task = bar.add_task(f"evaluating {adapter.engine_name}", total=1.0)

            def show(stage: str, fraction: float) -> None:
                bar.update(task, completed=fraction, description=f"{adapter.engine_name}: {stage}")

            return await run(settings, conn, evaluation.id, on_progress=show)


def report(
    evaluation_id: Annotated[int, typer.Argument(help="The evaluation (report) id.")],
    format: Annotated[
        Literal["md", "json", "html"], typer.Option("--format", "-f", help="md, json or html.")
    ] = "md",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to a file.")] = None,
) -> None:
    """Print a promotion report as Markdown, JSON or a standalone HTML page."""
    settings = load_settings()

    async def fetch(url: str) -> store.Evaluation | None:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            return await store.get(conn, evaluation_id)

    with migrated_database(settings) as url:
        evaluation = asyncio.run(fetch(url))
    if evaluation is None:
        err.print(f"[red]No evaluation with id {evaluation_id}.[/red]")
        raise typer.Exit(1)
    found = store.report_of(evaluation)
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
