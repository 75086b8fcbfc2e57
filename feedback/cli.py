"""`ratchet data ...`: build, inspect and export preference snapshots."""

from pathlib import Path
from typing import Annotated

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from feedback.errors import FeedbackError
from feedback.pairs import build as builder
from feedback.pairs import snapshots
from feedback.pairs.stats import stats
from ratchet.cli_support import err, load_settings, migrated_database

data_app = typer.Typer(help="Preference datasets built from votes.", no_args_is_help=True)


@data_app.command("build")
def data_build(
    min_pairs: Annotated[int, typer.Option(help="Refuse to build below this many pairs.")] = 1,
    timings: Annotated[
        bool, typer.Option("--timings", help="Print each stage's seconds (on stderr).")
    ] = False,
) -> None:
    """Build an immutable snapshot; its id is printed alone on the last line."""
    settings = load_settings()
    stages = builder.Timings()
    with migrated_database(settings) as url:
        try:
            with err.status("building preference pairs…"):
                snapshot = builder.build(
                    url, settings.pairs, settings.snapshots_dir, min_pairs, stages
                )
        except FeedbackError as exc:
            err.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
        finally:
            if timings:
                for stage, seconds in stages.items():
                    err.print(f"stage {stage}: {seconds:.2f} s", highlight=False)
                err.print(f"stage total: {sum(stages.values()):.2f} s", highlight=False)
    counts = builder.Counts.model_validate(snapshot.counts)
    typer.echo(f"pairs by rule: {counts.pairs}; by split: {counts.splits}; kto: {counts.kto}")
    typer.echo(f"content sha256: {snapshot.content_sha256}; files in {snapshot.path}")
    typer.echo(str(snapshot.id))


@data_app.command("export")
def data_export(
    snapshot_id: Annotated[int, typer.Argument(metavar="SNAPSHOT", help="Snapshot id.")],
    fmt: Annotated[str, typer.Option("--format", help="trl, axolotl or jsonl.")],
    out: Annotated[Path, typer.Option(help="Directory (trl, axolotl) or file (jsonl).")],
) -> None:
    """Export a snapshot's pairs for a trainer."""
    # Here, not at the top: `datasets` takes seconds to import, and every command pays.
    from feedback.pairs import export as exporter

    if fmt not in exporter.FORMATS:
        raise typer.BadParameter(
            f"must be one of {', '.join(exporter.FORMATS)}", param_hint="--format"
        )
    settings = load_settings()
    with migrated_database(settings) as url, psycopg.connect(url) as conn:
        try:
            snapshot = snapshots.require(conn, snapshot_id)
            path = exporter.export(snapshot, fmt, out)
        except FeedbackError as exc:
            err.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
    typer.echo(f"snapshot {snapshot_id} exported as {fmt} to {path}")


@data_app.command("stats")
def data_stats() -> None:
    """Votes since the last snapshot, the pairs each rule would yield, top drop reasons
    and the top voters."""
    settings = load_settings()
    with migrated_database(settings) as url:
        found = stats(url, settings.pairs)
    console = Console()
    since = f"snapshot {found.last_snapshot_id}" if found.last_snapshot_id else "ever"
    head = Table("since " + since, "count", title="New feedback")
    head.add_row("votes", str(found.new_votes))
    head.add_row("pairwise choices", str(found.new_choices))
    console.print(head)
    rules = Table("rule", "pairs", title="A build now would yield")
    for rule, n in found.would_yield.pairs.items():
        rules.add_row(rule, str(n))
    rules.add_row("[bold]total[/bold]", f"[bold]{found.would_yield.total_pairs}[/bold]")
    for split, n in found.would_yield.splits.items():
        rules.add_row(f"  {split} split", str(n))
    rules.add_row("KTO rows", str(sum(found.would_yield.kto.get(s, 0) for s in ("train", "test"))))
    console.print(rules)
    drops = Table("reason", "unit", "dropped", title="Top reasons rows were dropped")
    for reason, unit, n in found.top_drops():
        drops.add_row(reason, unit, str(n))
    console.print(drops)
    voters = Table("voter (key / user)", "votes", "share", title="Top voters (votes + choices)")
    for voter in found.top_voters:
        voters.add_row(voter.label, str(voter.votes), f"{voter.share:.1%}")
    console.print(voters)
