"""`ratchet eval ADAPTER`: an evaluation in the foreground."""

import asyncio
from typing import Annotated

import psycopg
import typer
from rich.progress import BarColumn, Progress, TimeElapsedColumn

from eval.errors import EvalError
from ratchet import evaluations, registry
from ratchet.cli_support import err, load_settings, migrated_database
from ratchet.errors import Busy
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
        except (EvalError, Busy) as exc:
            err.print(f"[red]Evaluation failed:[/red] {exc}")
            raise typer.Exit(1) from exc
    report = evaluations.report_of(evaluation)
    assert report is not None
    for criterion in report.decision.criteria:
        mark = "[green]✔[/green]" if criterion.passed else "[red]✘[/red]"
        if not criterion.informative:
            mark = "[dim]○[/dim]"  # cannot decide: neither passes nor fails
        err.print(f"{mark} {criterion.name}: {criterion.detail}")
    summary = {
        "evaluation_id": evaluation.id,
        "decision": evaluation.decision,
        "reasons": evaluation.reasons,
        "uninformative_benchmarks": [b.task for b in report.benchmarks if not b.informative],
        "report_url": f"/reports/{evaluation.id}",
    }
    import json

    print(json.dumps(summary))


async def _evaluate(settings: Settings, url: str, ref: str, run):  # type: ignore[no-untyped-def]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        adapter = await registry.find(conn, ref)
        if adapter is None:
            raise EvalError(f"no adapter matches {ref!r} (see `ratchet adapters list`)")
        evaluation = await evaluations.create(conn, adapter.id, "cli")
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
