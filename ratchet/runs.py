"""The `runs` table: one row per training, its progress, metrics and outcome."""

import json
import os
import socket
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import class_row
from pydantic import BaseModel

from ratchet.errors import Busy
from ratchet.processes import pid_alive

RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "skipped"]
_COLUMNS = (
    "id, kind, status, params, snapshot_id, adapter_id, step, total_steps, heartbeat_at,"
    " error, reason, created_at, started_at, finished_at, cancel_requested_at"
)


class Run(BaseModel):
    id: int
    kind: str
    status: RunStatus
    params: dict[str, Any]
    snapshot_id: int | None
    adapter_id: Any | None
    step: int
    total_steps: int | None
    heartbeat_at: datetime | None
    error: str | None
    reason: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None = None


class TrainingBusy(Busy):
    """Another training is queued or running; only one may be at a time."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"run {run_id} is already queued or running; one training at a time")
        self.run_id = run_id


def create(conninfo: str, params: dict[str, Any], status: RunStatus = "running") -> Run:
    """Insert a run owned by this process; TrainingBusy when another one is active."""
    try:
        with psycopg.connect(conninfo) as conn, conn.cursor(row_factory=class_row(Run)) as cur:
            run = cur.execute(
                "INSERT INTO runs (kind, status, params, started_at, heartbeat_at, worker_host,"
                " worker_pid) VALUES ('train', %s, %s, now(), now(), %s, %s) RETURNING " + _COLUMNS,
                (status, json.dumps(params), socket.gethostname(), os.getpid()),
            ).fetchone()
    except psycopg.errors.UniqueViolation as exc:
        active = active_training(conninfo)
        raise TrainingBusy(active.id if active else -1) from exc
    assert run is not None
    return run


def enqueue(conninfo: str, params: dict[str, Any]) -> Run:
    """Record a queued run; TrainingBusy when another one is queued or running."""
    return create(conninfo, params, status="queued")


def claim(conninfo: str, run_id: int) -> Run | None:
    """Move a queued run to running, owned by this process; None if it is not queued."""
    with psycopg.connect(conninfo) as conn, conn.cursor(row_factory=class_row(Run)) as cur:
        return cur.execute(
            "UPDATE runs SET status = 'running', started_at = now(), heartbeat_at = now(),"
            " worker_host = %s, worker_pid = %s WHERE id = %s AND status = 'queued'"
            " RETURNING " + _COLUMNS,
            (socket.gethostname(), os.getpid(), run_id),
        ).fetchone()


def skip(conninfo: str, params: dict[str, Any], reason: str) -> Run:
    """Record a run that was decided against, and why."""
    with psycopg.connect(conninfo) as conn, conn.cursor(row_factory=class_row(Run)) as cur:
        run = cur.execute(
            "INSERT INTO runs (kind, status, params, reason, finished_at)"
            " VALUES ('train', 'skipped', %s, %s, now()) RETURNING " + _COLUMNS,
            (json.dumps(params), reason),
        ).fetchone()
    assert run is not None
    return run


def cancel(conninfo: str, run_id: int) -> Run | None:
    """Cancel a queued run at once; ask a running one to stop at its next step (it stays
    `running`, holding the one-training slot, until its worker has stopped). None when
    there is no such active run."""
    with psycopg.connect(conninfo) as conn, conn.cursor(row_factory=class_row(Run)) as cur:
        return cur.execute(
            "UPDATE runs SET cancel_requested_at = now(),"
            " status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,"
            " finished_at = CASE WHEN status = 'queued' THEN now() END"
            " WHERE id = %s AND status IN ('queued', 'running') RETURNING " + _COLUMNS,
            (run_id,),
        ).fetchone()


def delete_queued(conninfo: str, run_id: int) -> None:
    """Undo `enqueue` when its job could not be deferred."""
    with psycopg.connect(conninfo) as conn:
        conn.execute("DELETE FROM runs WHERE id = %s AND status = 'queued'", (run_id,))


def set_param(conninfo: str, run_id: int, key: str, value: Any) -> None:
    with psycopg.connect(conninfo) as conn:
        conn.execute(
            "UPDATE runs SET params = params || jsonb_build_object(%s::text, %s::jsonb)"
            " WHERE id = %s",
            (key, json.dumps(value), run_id),
        )


def latest_metrics(conninfo: str, run_id: int) -> dict[str, float]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT DISTINCT ON (name) name, value FROM run_metrics WHERE run_id = %s"
            " ORDER BY name, step DESC",
            (run_id,),
        ).fetchall()
    return {str(name): float(value) for name, value in rows}


def active_training(conninfo: str) -> Run | None:
    with psycopg.connect(conninfo) as conn, conn.cursor(row_factory=class_row(Run)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM runs WHERE kind = 'train' AND status IN ('queued', 'running')"
        ).fetchone()


def recover_abandoned(conninfo: str, stale_after_s: float) -> list[int]:
    """Mark failed the running runs whose process died: at once when it lived on this
    host, else when its heartbeat is older than `stale_after_s`. Returns their ids."""
    host = socket.gethostname()
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT id, worker_host, worker_pid, heartbeat_at < now() - make_interval(secs => %s)"
            " FROM runs WHERE status = 'running'",
            (stale_after_s,),
        ).fetchall()
        dead = [
            run_id
            for run_id, worker_host, pid, stale in rows
            if stale or (worker_host == host and pid and not pid_alive(pid))
        ]
        if dead:
            conn.execute(
                "UPDATE runs SET status = 'failed', finished_at = now(), error ="
                " 'abandoned: its worker stopped (no heartbeat since ' || heartbeat_at || ')'"
                " WHERE id = ANY(%s) AND status = 'running'",
                (dead,),
            )
    return dead


def beat(conninfo: str, run_id: int) -> None:
    with psycopg.connect(conninfo) as conn:
        conn.execute("UPDATE runs SET heartbeat_at = now() WHERE id = %s", (run_id,))


def update(conninfo: str, run_id: int, **fields: Any) -> None:
    """Set columns; `finished=True` also stamps finished_at. Always beats the heartbeat."""
    finished = fields.pop("finished", False)
    sets = [f"{name} = %({name})s" for name in fields] + ["heartbeat_at = now()"]
    if finished:
        sets.append("finished_at = now()")
    with psycopg.connect(conninfo) as conn:
        conn.execute(
            f"UPDATE runs SET {', '.join(sets)} WHERE id = %(id)s", {**fields, "id": run_id}
        )


def log_metrics(conninfo: str, run_id: int, step: int, metrics: dict[str, float]) -> None:
    with psycopg.connect(conninfo) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO run_metrics (run_id, step, name, value) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (run_id, step, name) DO UPDATE SET value = EXCLUDED.value",
                [(run_id, step, k, float(v)) for k, v in metrics.items()],
            )
        conn.execute(
            "UPDATE runs SET step = %s, heartbeat_at = now() WHERE id = %s", (step, run_id)
        )


def get(conninfo: str, run_id: int) -> Run | None:
    with psycopg.connect(conninfo) as conn, conn.cursor(row_factory=class_row(Run)) as cur:
        return cur.execute(f"SELECT {_COLUMNS} FROM runs WHERE id = %s", (run_id,)).fetchone()


def list_runs(conninfo: str, limit: int = 50) -> list[Run]:
    with psycopg.connect(conninfo) as conn, conn.cursor(row_factory=class_row(Run)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM runs ORDER BY id DESC LIMIT %s", (limit,)
        ).fetchall()
