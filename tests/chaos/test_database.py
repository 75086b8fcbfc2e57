"""Postgres stopped under load: answers and votes keep coming from the spool, and all
of them are in the database once it is back; with the spool full or off, requests
get a fast 503 with Retry-After instead."""

import time
from pathlib import Path

import httpx
import pytest

from tests.chaos.conftest import ThrowawayPostgres, chaos_env, report, serve
from tests.chaos.load import Load, check_stored, unfinished
from tests.helpers import Engine, Gateway, wait_for

pytestmark = [pytest.mark.disruptive, pytest.mark.timeout(600)]


def readyz(gateway: Gateway) -> dict[str, object]:
    body: dict[str, object] = httpx.get(gateway.url + "/readyz", timeout=10).json()
    return body


def metric(gateway: Gateway, name: str) -> float:
    for line in httpx.get(gateway.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def wait_drained(gateway: Gateway, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        body = readyz(gateway)
        spool = body["spool"]
        assert isinstance(spool, dict)
        if body["checks"]["database"] and spool["entries"] == 0:  # type: ignore[index]
            return
        assert time.monotonic() < deadline, f"spool not replayed: {body}"
        time.sleep(0.5)


def check(gateway: Gateway, name: str) -> object:
    checks = readyz(gateway)["checks"]
    assert isinstance(checks, dict)
    return checks[name]


def storage(gateway: Gateway) -> object:
    return check(gateway, "storage")


def wait_database_back(gateway: Gateway, load: Load) -> None:
    """Until the gateway sees the database again, and serves a few requests more on it."""
    wait_for(lambda: check(gateway, "database") is True, 60, "the database to be seen again")
    load.wait_served(10)


def wait_no_streaming(database_url: str, timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while (left := unfinished(database_url))["streaming"] and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_postgres_down_for_30_s_loses_nothing(
    pg: ThrowawayPostgres,
    keys: dict[str, str],
    engine_pair: list[Engine],
    base_model_dir: Path,
    chaos_data: Path,
) -> None:
    env = chaos_env(pg, chaos_data, base_model_dir, engine_pair[:1])
    gateway = serve(env, chaos_data / "pg-down.log")
    try:
        load = Load(gateway.url, keys["chat"], threads=4, seed=1).start()
        load.wait_served(12)  # keys and the production mapping are in the caches now
        pg.stop()
        before, outage = load.ledger.ok(), time.monotonic()
        depths, databases = [], []
        while time.monotonic() - outage < 30:
            time.sleep(3)
            body = readyz(gateway)
            depths.append(body["spool"]["entries"])  # type: ignore[index]
            databases.append(body["checks"]["database"])  # type: ignore[index]
            assert body["status"] == "ready", body  # it still serves, from the spool
        during = load.ledger.ok() - before
        assert metric(gateway, "ratchet_database_up") == 0
        assert metric(gateway, "ratchet_spool_entries") > 0
        pg.start()
        wait_database_back(gateway, load)
        ledger = load.stop()
        wait_drained(gateway)
        assert metric(gateway, "ratchet_spool_replayed_total") > 0
    finally:
        try:
            if not pg.up():
                pg.start()
        finally:
            assert gateway.stop() == 0, gateway.log()
    lost = check_stored(ledger, pg.url)
    report(ledger.summary("Postgres stopped for 30 s", len(lost)))
    assert not ledger.violations, ledger.violations[:5]
    assert not lost, lost[:10]
    assert during > 20, "clients got few answers while the database was down"
    assert not any(databases) and max(depths) > 0
    assert wait_no_streaming(pg.url) == {
        "streaming": 0,
        "evaluations_without_job": 0,
        "runs_without_job": 0,
    }


@pytest.mark.parametrize(
    ("name", "setting"),
    [("full", {"spool_max_bytes": "1024"}), ("off", {"spool_enabled": "false"})],
    ids=["full", "off"],
)
def test_with_the_spool_full_or_off_requests_get_a_fast_503(
    name: str,
    setting: dict[str, str],
    pg: ThrowawayPostgres,
    keys: dict[str, str],
    engine_pair: list[Engine],
    base_model_dir: Path,
    chaos_data: Path,
) -> None:
    env = chaos_env(pg, chaos_data / f"spool-{name}", base_model_dir, engine_pair[:1], **setting)
    gateway = serve(env, chaos_data / f"spool-{name}.log")
    try:
        load = Load(gateway.url, keys["chat"], threads=4, seed=2).start()
        load.wait_served(8)  # keys are in the gateway's cache now
        pg.stop()
        # Twice the refusals the test asks for, and readiness has seen the outage.
        wait_for(lambda: load.ledger.statuses[503] > 20, 60, "refusals")
        wait_for(lambda: storage(gateway) is False, 30, "readiness to see it")
        refused = readyz(gateway)
        pg.start()
        wait_database_back(gateway, load)
        ledger = load.stop()
        wait_drained(gateway)
    finally:
        try:
            if not pg.up():
                pg.start()
        finally:
            assert gateway.stop() == 0, gateway.log()
    lost = check_stored(ledger, pg.url)
    report(ledger.summary(f"Postgres stopped, spool {name}", len(lost)))
    assert not ledger.violations, ledger.violations[:5]
    assert not lost, lost[:10]
    assert ledger.statuses[503] > 10
    # No request waits on the dead database: a 503 comes within one acquire timeout
    # (1 s here; 2 s by default) of the engine's answer (a chat's generation counts in
    # its time), far below any engine or request timeout.
    assert ledger.slowest_503_s < 3.5
    assert refused["checks"]["storage"] is False  # type: ignore[index]
