"""Jobs and their rows agree, whichever of the two a crash or a race leaves alone.

Row first, job lost: the process that committed the row died before deferring its
job; the row sits `queued` with nothing to run it. Job first, row not yet visible:
a fast worker runs the job before the row's transaction commits (what the gateway
did before rows were committed first) and finds nothing. Either way a worker's
sweep queues the row again, once.
"""

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from procrastinate import App, PsycopgConnector

from ratchet import jobs
from ratchet.settings import Settings
from ratchet.worker import make_app, sweep
from tests.helpers import fresh_database, query


@pytest.fixture
def url(server_url: str) -> Iterator[str]:
    with fresh_database(server_url, "ratchet_jobs") as fresh:
        yield fresh


def adapter(url: str) -> uuid.UUID:
    uid = uuid.uuid4()
    query(
        url,
        "INSERT INTO adapters (id, sha256, engine_name, path, status) VALUES"
        " (%s, %s, %s, '/nowhere', 'candidate') RETURNING id",
        uid,
        uid.hex * 2,
        f"ratchet-{uid.hex[:16]}",
    )
    return uid


def live_jobs(url: str, task: str, key: str, row_id: int) -> int:
    rows = query(
        url,
        "SELECT count(*) AS n FROM procrastinate_jobs WHERE task_name = %s"
        " AND status IN ('todo', 'doing') AND args->>%s = %s",
        task,
        key,
        str(row_id),
    )
    return int(rows[0]["n"])


def test_a_row_whose_job_was_lost_is_queued_again_once(url: str) -> None:
    insert = "INSERT INTO evaluations (adapter_id, status, requested_by, created_at) VALUES"
    old = query(url, insert + " (%s, 'queued', 't', now() - interval '1 minute') RETURNING id",
                adapter(url))[0]["id"]  # fmt: skip
    fresh = query(url, insert + " (%s, 'queued', 't', now()) RETURNING id", adapter(url))[0]["id"]
    ago = "now() - interval '1 minute'"
    runs = f"INSERT INTO runs (kind, status, created_at) VALUES ('train', 'queued', {ago})"
    run = query(url, runs + " RETURNING id")[0]["id"]

    async def twice() -> tuple[jobs.Orphans, jobs.Orphans]:
        app = App(connector=PsycopgConnector(conninfo=url))
        async with app.open_async():
            return await jobs.requeue_orphans(app, url), await jobs.requeue_orphans(app, url)

    first, second = asyncio.run(twice())
    assert first.evaluations == [old] and first.runs == [run]
    assert second.evaluations == [] and second.runs == []  # queued once, not once per sweep
    assert live_jobs(url, jobs.EVALUATE_TASK, "evaluation_id", old) == 1
    assert live_jobs(url, jobs.TRAIN_TASK, "run_id", run) == 1
    # A row younger than the grace may have its job on the way: left alone.
    assert live_jobs(url, jobs.EVALUATE_TASK, "evaluation_id", fresh) == 0


def test_a_job_that_ran_before_its_row_was_visible_is_repaired(url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=url, data_dir=tmp_path)
    target = adapter(url)
    with psycopg.connect(url) as writer:  # the row's transaction, not committed yet
        row = writer.execute(
            "INSERT INTO evaluations (adapter_id, status, requested_by)"
            " VALUES (%s, 'queued', 'test') RETURNING id",
            (target,),
        ).fetchone()
        assert row is not None
        evaluation_id = int(row[0])

        async def fast_worker() -> None:
            app = make_app(settings, url)
            async with app.open_async():
                await jobs.defer_evaluation(app, evaluation_id, target)
                await app.run_worker_async(queues=[jobs.QUEUE], wait=False)

        asyncio.run(fast_worker())  # it finds no queued row, and its job is done
        assert live_jobs(url, jobs.EVALUATE_TASK, "evaluation_id", evaluation_id) == 0
        writer.commit()
    status = query(url, "SELECT status FROM evaluations WHERE id = %s", evaluation_id)
    assert status == [{"status": "queued"}]  # a row queued with no job: stuck until...

    async def worker_starts() -> str:
        app = make_app(settings, url)
        async with app.open_async():
            return await sweep(app, settings, url, grace_s=0)

    done = asyncio.run(worker_starts())
    assert f"evaluations [{evaluation_id}]" in done
    assert live_jobs(url, jobs.EVALUATE_TASK, "evaluation_id", evaluation_id) == 1
