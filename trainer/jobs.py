"""Training as jobs: a queued run, and the nightly one (`ratchet.worker` runs them).

The `runs` table's unique index, not a job lock, keeps it to one training at a time.
"""

import logging
from typing import Any

import psycopg

from feedback.errors import FeedbackError, NotEnoughPairs
from feedback.pairs import build as builder
from ratchet import runs
from ratchet.config import TrainConfig
from ratchet.settings import Settings
from trainer.errors import TrainerError
from trainer.run import recover, run_training

log = logging.getLogger(__name__)


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
