"""The gateway itself fails: killed with SIGKILL under load, or stopped with SIGTERM
while streams are in flight."""

import asyncio
import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from procrastinate import App, PsycopgConnector

from ratchet import jobs
from ratchet.registry import Adapter
from tests.chaos.conftest import ThrowawayPostgres, chaos_env, report, serve
from tests.chaos.load import Load, check_stored, unfinished
from tests.helpers import Engine, auth, free_port, query, wait_for

pytestmark = [pytest.mark.disruptive, pytest.mark.timeout(600)]


async def worker_sweep(url: str) -> None:
    app = App(connector=PsycopgConnector(conninfo=url))
    async with app.open_async():
        await jobs.requeue_orphans(app, url, grace_s=0)


def ask_for_evaluations(url: str, ops: str, adapter: Adapter, stop: threading.Event) -> None:
    """An operator who keeps asking for an evaluation (202 once, then 409 while it is
    queued): the row and its job must agree whenever the gateway dies."""
    while not stop.is_set():
        with contextlib.suppress(httpx.TransportError):
            httpx.post(url + "/v1/admin/evaluations", headers=auth(ops),
                       json={"adapter": str(adapter.id)}, timeout=10)  # fmt: skip
        stop.wait(0.3)


def queued(url: str) -> list[dict[str, Any]]:
    return query(url, "SELECT id FROM evaluations WHERE status = 'queued'")


def test_a_gateway_killed_under_load_loses_nothing_acknowledged(
    pg: ThrowawayPostgres,
    keys: dict[str, str],
    engine_pair: list[Engine],
    adapters: list[Adapter],
    base_model_dir: Path,
    chaos_data: Path,
) -> None:
    env = chaos_env(pg, chaos_data, base_model_dir, engine_pair)
    port = free_port()
    first = serve(env, chaos_data / "killed.log", port=port)
    load = Load(first.url, keys["chat"], threads=6, seed=3).start()
    stop = threading.Event()
    operator = threading.Thread(
        target=ask_for_evaluations, args=(first.url, keys["ops"], adapters[0], stop)
    )
    operator.start()
    try:
        # Answers, votes and comparisons are flowing, and an evaluation is queued.
        load.wait_served(30)
        wait_for(lambda: bool(queued(pg.url)), 30, "an evaluation to be queued")
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
        killed_at = time.monotonic()
        second = serve(env, chaos_data / "restarted.log", port=port)  # the clients come back
        restarted_in = time.monotonic() - killed_at
        load.wait_served(30)  # served again, by the new gateway
    finally:
        ledger = load.stop()
        stop.set()
        operator.join(timeout=30)
    try:
        # The new gateway sweeps the dead one's streams when it registers.
        deadline = time.monotonic() + 20
        while unfinished(pg.url)["streaming"] and time.monotonic() < deadline:
            time.sleep(0.5)
        # A worker starting now would queue again a row whose job the kill cut off.
        asyncio.run(worker_sweep(pg.url))
        left = unfinished(pg.url)
        asked = queued(pg.url)
    finally:
        assert second.stop() == 0, second.log()
        # Nobody runs a worker on this database: leave no work queued for later tests.
        query(pg.url, "DELETE FROM procrastinate_jobs WHERE task_name = 'ratchet:evaluate'"
              " RETURNING id")  # fmt: skip
        query(pg.url, "UPDATE evaluations SET status = 'failed' WHERE status = 'queued'"
              " RETURNING id")  # fmt: skip
    lost = check_stored(ledger, pg.url)
    report(ledger.summary("gateway killed (SIGKILL) and restarted", len(lost)))
    assert not ledger.violations, ledger.violations[:5]
    assert not lost, lost[:10]
    assert ledger.no_response > 0  # the kill did cut requests
    assert left == {"streaming": 0, "evaluations_without_job": 0, "runs_without_job": 0}
    assert len(asked) == 1  # one queued evaluation of that adapter, with its job
    assert restarted_in < 60


def stream(url: str, key: str, max_tokens: int, out: dict[str, Any]) -> None:
    """One streamed chat; what the client saw goes into `out`."""
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": "Tell me a long story about a cat."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    text: list[str] = []
    out["outcome"] = "broken"
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth(key),
                          timeout=60) as response:  # fmt: skip
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["outcome"] = "done"
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["outcome"] = "error"
                    out["error"] = chunk["error"]
                    break
                out.setdefault("id", chunk["id"])
                text += [(c.get("delta") or {}).get("content") or "" for c in chunk["choices"]]
    except httpx.TransportError:
        pass
    out["text"] = "".join(text)


def test_sigterm_lets_streams_finish_within_the_grace_period_or_cuts_them(
    pg: ThrowawayPostgres,
    keys: dict[str, str],
    engine_pair: list[Engine],
    base_model_dir: Path,
    chaos_data: Path,
) -> None:
    grace = 4.0
    env = chaos_env(pg, chaos_data, base_model_dir, engine_pair,
                    shutdown_grace_s=str(grace))  # fmt: skip
    gateway = serve(env, chaos_data / "sigterm.log")
    plans = [8, 8, 250, 250]  # two streams that end well within the grace period, two not
    seen: list[dict[str, Any]] = [{} for _ in plans]
    clients = [
        threading.Thread(target=stream, args=(gateway.url, keys["chat"], n, out))
        for n, out in zip(plans, seen, strict=True)
    ]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 60
    while not all("id" in s for s in seen):  # every stream has started
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
    gateway.process.send_signal(signal.SIGTERM)
    terminated = time.monotonic()
    try:
        readiness = httpx.get(gateway.url + "/readyz", timeout=5).status_code
    except httpx.TransportError:
        readiness = 0  # not even listening any more: not ready either
    for client in clients:
        client.join(timeout=60)
    code = gateway.process.wait(timeout=60)
    stopped_in = time.monotonic() - terminated
    rows = {
        r["id"].replace("-", ""): r
        for r in query(
            pg.url,
            "SELECT id::text, status, output FROM completions WHERE id = ANY(%s::uuid[])",
            [s["id"].split("-", 1)[1] for s in seen],
        )  # fmt: skip
    }
    outcomes = [s["outcome"] for s in seen]
    lost = [
        s["id"]
        for s in seen
        if rows.get(s["id"].split("-", 1)[1], {}).get("output") != s["text"]
        or rows[s["id"].split("-", 1)[1]]["status"]
        != ("complete" if s["outcome"] == "done" else "aborted")
    ]
    report({"fault": f"SIGTERM with {len(seen)} streams in flight", "sent": len(seen),
            "2xx": sum("id" in s for s in seen), "503": 0, "other": 0,
            "no_response": outcomes.count("broken"), "lost": len(lost)})  # fmt: skip
    assert code == 0, gateway.log()
    assert readiness != 200
    assert outcomes == ["done", "done", "error", "error"], seen
    assert all(s["error"]["code"] == "server_shutting_down" for s in seen[2:])
    assert not lost, (lost, rows)
    assert all(s["text"] for s in seen)  # what was said before the cut is kept
    assert grace <= stopped_in < grace + 15, stopped_in
    assert unfinished(pg.url)["streaming"] == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(gateway.url + "/healthz", timeout=2)  # nothing is left running
