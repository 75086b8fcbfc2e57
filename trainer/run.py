"""One training run, start to finish: snapshot, run row, TRL, artifact, registry.

Used by `ratchet train` in the foreground (and by the job worker, issue 4's next
part). Every step's metrics go to `run_metrics`; a run whose status is set to
`cancelled` stops at the next step; any failure marks the run `failed` with its
error and leaves no adapter behind.
"""

import asyncio
import contextlib
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from transformers import TrainerCallback

from feedback.pairs import build as builder
from feedback.pairs import snapshots
from feedback.pairs.snapshots import Snapshot
from ratchet import evaluations, jobs, registry, runs
from ratchet.config import TrainConfig
from ratchet.errors import Busy
from ratchet.model import base_model_sha256
from ratchet.settings import Settings
from trainer import artifacts
from trainer.errors import NotEnoughData, TrainerError
from trainer.train import data_kind, train

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
# What goes to run_metrics from TRL's logs (train and eval_ prefixed).
LOGGED = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "learning_rate",
)


class RunCancelled(TrainerError):
    """The run was cancelled while it trained."""


class RunRecorder(TrainerCallback):  # type: ignore[misc]  # transformers is not analysed
    """Writes progress and metrics of a TRL run into its `runs` row; obeys cancel."""

    def __init__(self, conninfo: str, run_id: int, progress: Progress | None) -> None:
        self.conninfo = conninfo
        self.run_id = run_id
        self.progress = progress
        self.cancelled = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        runs.update(self.conninfo, self.run_id, total_steps=int(state.max_steps))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        picked = {
            key: float(value)
            for key, value in (logs or {}).items()
            if key.removeprefix("eval_") in LOGGED and isinstance(value, int | float)
        }
        if picked:
            runs.log_metrics(self.conninfo, self.run_id, int(state.global_step), picked)

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self.progress:
            self.progress(int(state.global_step), int(state.max_steps))
        run = runs.get(self.conninfo, self.run_id)
        if run is not None and run.cancel_requested_at is not None:
            self.cancelled = True
            control.should_training_stop = True


def run_training(
    settings: Settings,
    conninfo: str,
    config: TrainConfig,
    snapshot_id: int | None = None,
    progress: Progress | None = None,
    run_id: int | None = None,
) -> runs.Run:
    """Train on a snapshot (a new one when none is given); return the finished run.

    With `run_id`, that queued run is claimed (the worker's path); a run cancelled
    before it started is returned untouched. Without, a new run is recorded once
    the snapshot is known (the foreground path)."""
    recover(settings, conninfo)
    if run_id is None:
        snapshot = _usable_snapshot(settings, conninfo, config, snapshot_id)
        run = runs.create(conninfo, {"config": config.model_dump(), "snapshot_id": snapshot.id})
    else:
        claimed = runs.claim(conninfo, run_id)
        if claimed is None:
            found = runs.get(conninfo, run_id)
            assert found is not None
            return found
        run = claimed
        try:
            snapshot = _usable_snapshot(settings, conninfo, config, snapshot_id)
        except BaseException as exc:
            runs.update(
                conninfo,
                run.id,
                status="failed",
                error=f"{type(exc).__name__}: {exc}",
                finished=True,
            )
            raise
    runs.update(conninfo, run.id, snapshot_id=snapshot.id)
    return _execute(settings, conninfo, config, snapshot, run.id, progress)


def _usable_snapshot(
    settings: Settings, conninfo: str, config: TrainConfig, snapshot_id: int | None
) -> Snapshot:
    snapshot = _snapshot(settings, conninfo, config, snapshot_id)
    kind = data_kind(config)  # KTO trains on the unpaired rows, the others on pairs
    train_rows = int(snapshot.counts["kto" if kind == "kto" else "splits"].get("train", 0))
    if train_rows < config.min_pairs:
        raise NotEnoughData(
            f"snapshot {snapshot.id} has {train_rows} training {kind} rows for"
            f" {config.algorithm}; at least {config.min_pairs} are needed"
        )
    return snapshot


def _execute(
    settings: Settings,
    conninfo: str,
    config: TrainConfig,
    snapshot: Snapshot,
    run_id: int,
    progress: Progress | None,
) -> runs.Run:
    work = artifacts.work_dir(settings.adapters_dir, run_id)
    try:
        with heartbeat(conninfo, run_id, settings.run_heartbeat_s):
            adapter = _train_and_register(
                settings, conninfo, config, snapshot, run_id, work, progress
            )
    except RunCancelled:
        runs.update(conninfo, run_id, status="cancelled", finished=True)
    except BaseException as exc:
        runs.update(
            conninfo, run_id, status="failed", error=f"{type(exc).__name__}: {exc}", finished=True
        )
        raise
    else:
        runs.update(
            conninfo,
            run_id,
            status="succeeded",
            adapter_id=adapter.id,
            reason=_queue_evaluation(conninfo, adapter.id),
            finished=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    finished = runs.get(conninfo, run_id)
    assert finished is not None
    return finished


def _queue_evaluation(conninfo: str, adapter_id: uuid.UUID) -> str:
    """Queue the candidate's evaluation; the run's note says whether that worked."""
    try:
        evaluation_id = asyncio.run(jobs.queue_evaluation(conninfo, adapter_id, "training"))
    except Busy as exc:
        return f"awaiting evaluation ({exc})"
    except Exception as exc:  # the adapter is registered either way; say what went wrong
        log.warning("could not queue the evaluation of %s: %s", adapter_id, exc)
        return f"awaiting evaluation (not queued: {exc})"
    return f"awaiting evaluation {evaluation_id}"


def recover(settings: Settings, conninfo: str) -> list[int]:
    """Fail the runs whose worker died, and remove what they left half-written."""
    dead = runs.recover_abandoned(conninfo, settings.run_stale_after_s)
    for evaluation_id in evaluations.recover_abandoned(conninfo, settings.run_stale_after_s):
        log.warning("evaluation %s was abandoned by its worker; marked failed", evaluation_id)
    active = {r.id for r in runs.list_runs(conninfo, 1000) if r.status == "running"}
    artifacts.sweep(settings.adapters_dir, keep=active)
    return dead


@contextmanager
def heartbeat(conninfo: str, run_id: int, every: float) -> Iterator[None]:
    """Beat the run's heartbeat from a thread while the body runs (loading a model or
    a long step may take minutes between TRL's own callbacks)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):  # a missed beat is not worth a crash
                runs.beat(conninfo, run_id)

    thread = threading.Thread(target=loop, name=f"heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _snapshot(
    settings: Settings, conninfo: str, config: TrainConfig, snapshot_id: int | None
) -> Snapshot:
    if snapshot_id is None:
        # A KTO run needs unpaired rows, not pairs: it is checked on those afterwards.
        min_pairs = 0 if data_kind(config) == "kto" else config.min_pairs
        return builder.build(conninfo, settings.pairs, settings.snapshots_dir, min_pairs)
    with psycopg.connect(conninfo) as conn:
        return snapshots.require(conn, snapshot_id)


def _train_and_register(
    settings: Settings,
    conninfo: str,
    config: TrainConfig,
    snapshot: Snapshot,
    run_id: int,
    work: Path,
    progress: Progress | None,
) -> registry.Adapter:
    recorder = RunRecorder(conninfo, run_id, progress)
    data = snapshot.load(data_kind(config))
    result = train(settings.base_model_ref, data, config, work, [recorder])
    if recorder.cancelled:
        raise RunCancelled(f"run {run_id} was cancelled at step {result.steps}")
    final = {
        f"final/{k}": v for k, v in result.eval_metrics.items() if k.removeprefix("eval_") in LOGGED
    }
    if final:
        runs.log_metrics(conninfo, run_id, result.steps, final)
    base_sha = base_model_sha256(settings)
    card = {
        "run_id": run_id,
        "base_model": settings.base_model_ref,
        "base_model_sha256": base_sha,
        "snapshot_id": snapshot.id,
        "snapshot_sha256": snapshot.content_sha256,
        "config": config.model_dump(),
        "steps": result.steps,
        "wall_s": result.wall_s,
        "train_metrics": result.train_metrics,
        "eval_metrics": result.eval_metrics,
    }
    sha, path = artifacts.finalize(
        result.adapter_dir,
        settings.adapters_dir,
        settings.base_model_ref,
        settings.engine_max_lora_rank,
        card,
    )

    async def register() -> registry.Adapter:
        async with (
            await psycopg.AsyncConnection.connect(conninfo) as conn,
            registry.locked(conn, sha),  # an API registration of the same files waits
        ):
            known = await registry.get_by_sha(conn, sha)
            return known or await registry.register(
                conn,
                sha,
                path,
                base_sha,
                source=f"run:{run_id}",
                run_id=run_id,
                snapshot_id=snapshot.id,
            )

    return asyncio.run(register())
