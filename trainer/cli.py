"""`ratchet train` (one run in the foreground) and `ratchet runs`."""

from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from feedback.errors import FeedbackError
from ratchet import runs
from ratchet.cli_support import err, load_settings, migrated_database
from ratchet.config import TrainConfig
from ratchet.errors import Busy
from trainer.errors import TrainerError


def train(
    snapshot: Annotated[
        int | None, typer.Option(help="Train on this snapshot; default: build a new one.")
    ] = None,
    algorithm: Annotated[str | None, typer.Option(help="dpo.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per step.")] = None,
    min_pairs: Annotated[int | None, typer.Option(help="Refuse below N train pairs.")] = None,
) -> None:
    """Train a LoRA on preference pairs in the foreground, with a progress bar."""
    from trainer.run import run_training

    overrides: dict[str, Any] = {
        "algorithm": algorithm,
        "learning_rate": learning_rate,
        "epochs": epochs,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "min_pairs": min_pairs,
    }
    try:
        config = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err.print(f"[red]Invalid training settings:[/red] {exc}")
        raise typer.Exit(2) from exc
    settings = load_settings()
    with (
        migrated_database(settings) as url,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
        ) as bar,
    ):
        task = bar.add_task("training", total=None)
        try:
            run = run_training(
                settings,
                url,
                config,
                snapshot,
                lambda step, total: bar.update(task, completed=step, total=total),
            )
        except (TrainerError, FeedbackError, Busy) as exc:
            err.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
    typer.echo(f"run {run.id} {run.status}: {run.step} steps on snapshot {run.snapshot_id}")
    if run.adapter_id:
        typer.echo(f"adapter {run.adapter_id} registered as candidate ({run.reason})")
    if run.status != "succeeded":
        raise typer.Exit(1)


def list_runs() -> None:
    """Training runs, newest first."""
    settings = load_settings()
    with migrated_database(settings) as url:
        found = runs.list_runs(url)
    table = Table("id", "status", "progress", "snapshot", "adapter", "started", "note")
    for r in found:
        progress = f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step)
        started = f"{r.started_at:%Y-%m-%d %H:%M}" if r.started_at else ""
        table.add_row(
            str(r.id),
            r.status,
            progress,
            str(r.snapshot_id or ""),
            str(r.adapter_id or "")[:8],
            started,
            r.error or r.reason or "",
        )
    Console().print(table)
