"""A training killed with SIGKILL leaves no adapter; the next start marks it failed,
removes its half-written files, and training works again. One training at a time."""

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ratchet import runs
from tests.feedback import factories as f
from tests.helpers import RATCHET, fresh_database, query

LONG = " with enough words in it to pass the length filter easily"


@pytest.fixture(scope="module")
def crash_db(server_url: str) -> Iterator[str]:
    """A database of this module's own: a training's snapshot takes every pair in the
    database, and in the shared one other modules' pairs made each run here score
    (and precompute the reference for) hundreds of pairs it does not need."""
    with fresh_database(server_url) as url:
        yield url


def seed_pairs(conninfo: str, n: int = 12) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for i in range(n):
            a = f.answer(conn, f"crash question {i}", f"a rambling answer {i}" + LONG)
            f.vote(conn, a, -1, user="crash", correction=f"A crisp answer {i}" + LONG)


def train(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [RATCHET, "train", "--min-pairs", "4", "--batch-size", "2", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def start_long_training(conninfo: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    """Start a 500-step training; return it and its run id once it is mid-step."""
    process = train(env, "--max-steps", "500")
    deadline = time.monotonic() + 300
    while not (
        rows := query(conninfo, "SELECT * FROM runs WHERE status = 'running' AND step >= 1")
    ):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.5)
    return process, int(rows[0]["id"])


def test_sigkill_mid_training_is_recovered(
    crash_db: str, gateway_env: dict[str, str], data_dir: Path
) -> None:
    seed_pairs(crash_db)
    env = {**os.environ, **gateway_env, "DATABASE_URL": crash_db, "RATCHET_DATA_DIR": str(data_dir)}
    victim, run_id = start_long_training(crash_db, env)
    assert (data_dir / "adapters" / f".work-{run_id}").is_dir()

    second = train(env, "--max-steps", "1")  # one training at a time
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 1 and f"run {run_id} is already queued or running" in stderr

    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert (
        query(crash_db, "SELECT status FROM runs WHERE id = %s", run_id)[0]["status"] == "running"
    )  # nobody has noticed yet

    after = train(env, "--max-steps", "1")
    stdout, stderr = after.communicate(timeout=600)
    assert after.returncode == 0, stderr[-3000:]
    dead = query(crash_db, "SELECT * FROM runs WHERE id = %s", run_id)[0]
    assert dead["status"] == "failed" and dead["error"].startswith("abandoned")
    assert dead["finished_at"] is not None
    assert query(crash_db, "SELECT id FROM adapters WHERE run_id = %s", run_id) == []
    assert not (data_dir / "adapters" / f".work-{run_id}").exists()
    newest = query(crash_db, "SELECT status FROM runs ORDER BY id DESC LIMIT 1")[0]
    assert newest["status"] == "succeeded"


def test_cancelling_a_running_training_stops_it_and_keeps_the_slot_until_then(
    crash_db: str, gateway_env: dict[str, str], data_dir: Path
) -> None:
    seed_pairs(crash_db)
    env = {**os.environ, **gateway_env, "DATABASE_URL": crash_db, "RATCHET_DATA_DIR": str(data_dir)}
    running, run_id = start_long_training(crash_db, env)
    asked = runs.cancel(crash_db, run_id)
    assert asked is not None and asked.status == "running"  # until its worker stops
    assert asked.cancel_requested_at is not None
    _, stderr = running.communicate(timeout=300)
    assert running.returncode == 1, stderr[-2000:]
    stopped = query(crash_db, "SELECT * FROM runs WHERE id = %s", run_id)[0]
    assert stopped["status"] == "cancelled" and stopped["finished_at"] is not None
    assert stopped["step"] < 500
    assert query(crash_db, "SELECT id FROM adapters WHERE run_id = %s", run_id) == []
    assert not (data_dir / "adapters" / f".work-{run_id}").exists()
