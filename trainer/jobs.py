"""Training as jobs on Postgres (procrastinate): queued runs, and the nightly one.

Tasks are made per app (`make_app`) so that they close over the settings built at
start-up; nothing is registered at import time. Any number of workers on any number
of machines share the queue; the `runs` table's unique index, not a job lock, keeps
it to one training at a time.
"""

import logging
import uuid
from typing import Any

import psycopg
from procrastinate import App, Blueprint, PsycopgConnector

from feedback.errors import FeedbackError, NotEnoughPairs
from feedback.pairs import build as builder
from ratchet.settings import Settings
from trainer import runs
from trainer.config import TrainConfig
from trainer.errors import TrainerError
from trainer.queue import QUEUE
from trainer.run import recover, run_training

log = logging.getLogger(__name__)


def make_app(settings: Settings, conninfo: str) -> App:
    blueprint = Blueprint()

    @blueprint.task(name="train", queue=QUEUE)
    def train(run_id: int) -> None:
        execute_queued(settings, conninfo, run_id)

    @blueprint.task(name="evaluate", queue=QUEUE)
    async def evaluate(adapter_id: str, evaluation_id: int | None = None) -> None:
        await run_evaluation(settings, conninfo, adapter_id, evaluation_id)

    @blueprint.periodic(cron=settings.train_cron, periodic_id="nightly")
    @blueprint.task(name="nightly", queue=QUEUE)
    def nightly_job(timestamp: int) -> None:
        nightly(settings, conninfo)

    app = App(
        connector=PsycopgConnector(conninfo=conninfo),
        worker_defaults={"update_heartbeat_interval": 10, "stalled_worker_timeout": 30},
    )
    app.add_tasks_from(blueprint, namespace="ratchet")
    return app


async def run_evaluation(
    settings: Settings, conninfo: str, adapter_id: str, evaluation_id: int | None
) -> None:
    """The gate on one candidate; a new candidate's job comes without an evaluation row."""
    from eval import store
    from eval.errors import EvalError
    from eval.run import evaluate

    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        if evaluation_id is None:
            try:
                evaluation_id = (await store.create(conn, uuid.UUID(adapter_id), "training")).id
            except store.EvaluationBusy as exc:
                log.info("adapter %s: %s", adapter_id, exc)
                return
        try:
            await evaluate(settings, conn, evaluation_id)
        except EvalError as exc:  # recorded on the evaluation already
            log.warning("evaluation %s failed: %s", evaluation_id, exc)


def execute_queued(settings: Settings, conninfo: str, run_id: int) -> None:
    run = runs.get(conninfo, run_id)
    if run is None or run.status != "queued":  # cancelled, or failed by recovery
        log.info("run %s is %s; nothing to do", run_id, run.status if run else "gone")
        return
    config = TrainConfig(**run.params.get("config", {}))
    try:
        run_training(settings, conninfo, config, run.params.get("snapshot_id"), run_id=run_id)
    except (TrainerError, FeedbackError) as exc:  # recorded on the run already
        log.warning("run %s failed: %s", run_id, exc)


def nightly(settings: Settings, conninfo: str) -> runs.Run:
    """Build a snapshot; train when it has at least `min_new_pairs` pairs that the last
    successful run did not see, else record a skipped run saying why."""
    recover(settings, conninfo)
    config = TrainConfig()
    try:
        snapshot = builder.build(conninfo, settings.pairs, settings.snapshots_dir)
    except NotEnoughPairs as exc:
        return runs.skip(conninfo, {"trigger": "nightly"}, f"no snapshot: {exc}")
    new = new_pairs(conninfo, snapshot.id)
    if new < settings.min_new_pairs:
        return runs.skip(
            conninfo,
            {"trigger": "nightly", "snapshot_id": snapshot.id},
            f"{new} new pairs since the last run; {settings.min_new_pairs} needed",
        )
    run = runs.enqueue(
        conninfo, {"trigger": "nightly", "config": config.model_dump(), "snapshot_id": snapshot.id}
    )
    return run_training(settings, conninfo, config, snapshot.id, run_id=run.id)


def new_pairs(conninfo: str, snapshot_id: int) -> int:
    """Pairs of this snapshot absent from the last successful run's (pair ids are stable)."""
    with psycopg.connect(conninfo) as conn:
        row: Any = conn.execute(
            "SELECT count(*) FROM pairs p WHERE p.snapshot_id = %s AND NOT EXISTS ("
            " SELECT 1 FROM pairs q WHERE q.id = p.id AND q.snapshot_id = ("
            "  SELECT snapshot_id FROM runs WHERE kind = 'train' AND status = 'succeeded'"
            "  ORDER BY id DESC LIMIT 1))",
            (snapshot_id,),
        ).fetchone()
    return int(row[0])


async def release_stalled(app: App, stale_after_s: float) -> int:
    """Jobs left `doing` by a killed worker would stay so forever: retry them (the task
    then finds its run failed by recovery and does nothing). Returns how many."""
    stalled = list(await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stale_after_s))
    for job in stalled:
        await app.job_manager.retry_job(job)
    return len(stalled)
