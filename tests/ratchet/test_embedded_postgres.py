"""With no DATABASE_URL, Ratchet runs on an embedded Postgres and stops it on exit."""

import json
import os
import subprocess
from pathlib import Path

import httpx

from ratchet.migrate import available
from tests.helpers import RATCHET, Gateway, auth, start_gateway


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["RATCHET_DATA_DIR"] = str(data_dir)
    return env


def ratchet(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RATCHET, *args], env=embedded_env(data_dir), capture_output=True, text=True, timeout=120
    )


def assert_stopped(pgdata: Path) -> None:
    assert (pgdata / "PG_VERSION").is_file()  # it did run here
    assert not (pgdata / "postmaster.pid").exists(), "embedded Postgres still running"


def test_cli_starts_migrates_and_stops_embedded_server(tmp_path: Path) -> None:
    first = ratchet(tmp_path, "db", "migrate")
    assert first.returncode == 0, first.stderr
    assert f"schema at version {len(available())}" in first.stdout
    assert_stopped(tmp_path / "postgres")
    created = ratchet(tmp_path, "keys", "create", "--role", "ops")
    assert created.returncode == 0, created.stderr
    listed = ratchet(tmp_path, "keys", "list")
    assert "ops" in listed.stdout  # the data survived the restart
    assert_stopped(tmp_path / "postgres")


def test_dead_holders_are_pruned(tmp_path: Path) -> None:
    assert ratchet(tmp_path, "db", "migrate").returncode == 0
    holders = tmp_path / "postgres" / ".handle_pids.json"
    holders.write_text(json.dumps([2**22 + 17]))  # a PID no process has (killed with -9)
    result = ratchet(tmp_path, "db", "migrate")
    assert result.returncode == 0, result.stderr
    assert json.loads(holders.read_text()) == []
    assert_stopped(tmp_path / "postgres")


def test_serve_on_embedded_database_prints_a_chat_key(
    tmp_path: Path, gateway: Gateway, base_model_dir: Path
) -> None:
    env = embedded_env(tmp_path)
    env["RATCHET_BASE_MODEL"] = str(base_model_dir)
    assert gateway.engine_url
    served = start_gateway(
        env, tmp_path / "serve.log", "--engine-url", gateway.engine_url, ready_timeout=120
    )
    try:
        lines = [ln for ln in served.log().splitlines() if ln.startswith("Chat key")]
        key = lines[0].split(": ", 1)[1].strip()
        reply = httpx.post(
            served.url + "/v1/chat/completions",
            headers=auth(key),
            timeout=60,
            json={
                "model": "base",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        )
        assert reply.status_code == 200, reply.text
        vote = httpx.post(
            served.url + "/v1/feedback",
            headers=auth(key),
            json={"completion_id": reply.json()["id"], "rating": "up"},
        )
        assert vote.status_code == 200  # the answer is in the embedded database
    finally:
        assert served.stop() == 0, served.log()
    assert_stopped(tmp_path / "postgres")
    assert (tmp_path / "chat-key").read_text().strip() == key
