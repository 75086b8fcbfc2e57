"""Retraining through the API: validation, one run at a time, status, cancel, the
worker running a queued job, and the nightly run skipping when there is too little."""

import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ratchet.settings import Settings
from serve.app import create_app
from tests.helpers import RATCHET, Gateway, auth, fresh_database, make_key, query
from tests.trainer.test_crash_recovery import seed_pairs
from trainer.jobs import nightly

FAST = {"max_steps": 2, "batch_size": 2, "min_pairs": 4}


@pytest.fixture(scope="module")
def jobs_db(server_url: str) -> Iterator[str]:
    """A database of this module's own: `worker --once` runs every queued job, and the
    shared one holds evaluations that other modules' trainings queued."""
    with fresh_database(server_url) as url:
        yield url


@pytest.fixture(scope="module")
def jobs_ops(jobs_db: str) -> tuple[str, str]:
    return make_key(jobs_db, "ops")


@pytest.fixture(scope="module")
def jobs_chat(jobs_db: str) -> tuple[str, str]:
    return make_key(jobs_db, "chat")


@pytest.fixture(scope="module")
def settings(jobs_db: str, base_model_dir: Path, data_dir: Path) -> Settings:
    return Settings(database_url=jobs_db, data_dir=data_dir, base_model=str(base_model_dir))


@pytest.fixture(scope="module")
def client(settings: Settings, gateway: Gateway, jobs_db: str) -> Iterator[TestClient]:
    seed_pairs(jobs_db)
    assert settings.database_url
    with TestClient(
        create_app(settings, settings.database_url, engine_url=gateway.engine_url)
    ) as test_client:
        yield test_client


def run_count(conninfo: str) -> int:
    return int(query(conninfo, "SELECT count(*) AS n FROM runs")[0]["n"])


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"learning_rate": -1}, 400, "learning_rate"),
        ({"algorithm": "ppo"}, 400, "algorithm"),
        ({"epochs": 0}, 400, "epochs"),
        ({"unknown": 1}, 400, "unknown"),
        ({"snapshot_id": 999999}, 404, "snapshot_id"),
        ({"min_pairs": 10**6}, 400, "min_pairs"),
    ],
)
def test_bad_retrain_requests_create_no_run(
    client: TestClient,
    jobs_ops: tuple[str, str],
    jobs_db: str,
    body: dict[str, object],
    status: int,
    param: str,
) -> None:
    before = run_count(jobs_db)
    response = client.post("/v1/admin/retrain", json=body, headers=auth(jobs_ops[1]))
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert run_count(jobs_db) == before


def test_one_training_at_a_time_status_and_cancel(
    client: TestClient, jobs_ops: tuple[str, str], jobs_chat: tuple[str, str]
) -> None:
    chat = client.post("/v1/admin/retrain", json=FAST, headers=auth(jobs_chat[1]))
    assert chat.status_code == 403
    with ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(
                lambda _: client.post("/v1/admin/retrain", json=FAST, headers=auth(jobs_ops[1])),
                range(2),
            )
        )
    assert sorted(a.status_code for a in answers) == [202, 409]
    accepted = next(a for a in answers if a.status_code == 202).json()
    refused = next(a for a in answers if a.status_code == 409)
    assert refused.json()["error"]["code"] == "training_busy"
    assert refused.headers["location"] == f"/v1/admin/runs/{accepted['id']}"
    assert accepted["status"] == "queued" and accepted["params"]["job_id"]

    shown = client.get(f"/v1/admin/runs/{accepted['id']}", headers=auth(jobs_ops[1])).json()
    assert shown["status"] == "queued"
    cancelled = client.post(f"/v1/admin/runs/{accepted['id']}/cancel", headers=auth(jobs_ops[1]))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/admin/runs/{accepted['id']}/cancel", headers=auth(jobs_ops[1]))
    assert again.status_code == 409 and again.json()["error"]["code"] == "run_finished"
    missing = client.get("/v1/admin/runs/999999", headers=auth(jobs_ops[1]))
    assert missing.status_code == 404
    listed = client.get("/v1/admin/runs", headers=auth(jobs_ops[1])).json()["data"]
    assert accepted["id"] in [r["id"] for r in listed]


def test_worker_runs_the_queued_training(
    client: TestClient,
    jobs_ops: tuple[str, str],
    gateway_env: dict[str, str],
    data_dir: Path,
    jobs_db: str,
) -> None:
    queued = client.post("/v1/admin/retrain", json=FAST, headers=auth(jobs_ops[1]))
    assert queued.status_code == 202, queued.text
    run_id = queued.json()["id"]
    env = {
        **os.environ,
        **gateway_env,
        "DATABASE_URL": jobs_db,
        "RATCHET_DATA_DIR": str(data_dir),
        "RATCHET_ENGINE_URL": client.app.state.services.engines.first().base_url,  # type: ignore[attr-defined]
        "RATCHET_EVAL__TASKS": "[]",
        "RATCHET_EVAL__DIFF_MAX_TOKENS": "8",  # wiring only: the gate tests read the answers
    }
    worker = subprocess.run(
        [RATCHET, "worker", "--once"], env=env, capture_output=True, text=True, timeout=600
    )
    assert worker.returncode == 0, worker.stderr[-3000:]
    done = client.get(f"/v1/admin/runs/{run_id}", headers=auth(jobs_ops[1])).json()
    assert done["status"] == "succeeded", done
    assert (done["step"], done["total_steps"], done["progress"]) == (2, 2, 1.0)
    assert "loss" in done["metrics"] and done["adapter_id"]
    jobs = query(
        jobs_db,
        "SELECT status FROM procrastinate_jobs WHERE id = %s",
        done["params"]["job_id"],
    )
    assert jobs[0]["status"] == "succeeded"
    # The candidate's evaluation was queued and run by the same worker: a decided
    # report (benchmarks are left out here; the gate tests run them).
    evaluation = query(
        jobs_db, "SELECT * FROM evaluations WHERE adapter_id = %s", done["adapter_id"]
    )
    assert evaluation and evaluation[0]["status"] == "succeeded", evaluation
    assert evaluation[0]["decision"] in ("pass", "fail") and evaluation[0]["reasons"]
    assert evaluation[0]["report"]["diff_summary"]["n"] >= 32


def test_nightly_skips_below_min_new_pairs(
    settings: Settings, client: TestClient, jobs_ops: tuple[str, str]
) -> None:
    assert settings.database_url
    run = nightly(settings.model_copy(update={"min_new_pairs": 10**6}), settings.database_url)
    assert run.status == "skipped" and "new pairs since the last run" in (run.reason or "")
    shown = client.get(f"/v1/admin/runs/{run.id}", headers=auth(jobs_ops[1])).json()
    assert shown["status"] == "skipped"
