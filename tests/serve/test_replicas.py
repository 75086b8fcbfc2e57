"""Two real vLLM CPU engines behind one gateway: a promotion reaches both, and a
replica that restarts gets production loaded again before it takes requests, while
requests keep succeeding on the other one."""

import asyncio
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from ratchet.replicas import EngineSet
from ratchet.settings import Settings
from serve.metrics import Metrics
from tests.helpers import (
    Engine,
    Gateway,
    auth,
    free_port,
    fresh_database,
    make_key,
    make_lora,
    query,
    register_adapter,
    start_gateway,
    wait_for,
)

pytestmark = [pytest.mark.disruptive, pytest.mark.timeout(1500)]
GREEDY = {"temperature": 0, "max_tokens": 16,
          "messages": [{"role": "user", "content": "Name a color."}]}  # fmt: skip


@pytest.fixture
def engines(engine_processes: list[Engine]) -> list[Engine]:
    """The two engines, maybe still coming up: the test's own set-up runs meanwhile."""
    return engine_processes


def engines_view(gateway: Gateway, key: str) -> dict[str, dict[str, Any]]:
    response = httpx.get(gateway.url + "/v1/admin/engines", headers=auth(key), timeout=10)
    assert response.status_code == 200, response.text
    return {r["url"]: r for r in response.json()["data"]}


def loads(gateway: Gateway, url: str, reason: str) -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    wanted = f'ratchet_engine_adapter_loads_total{{engine="{url}",reason="{reason}"}} '
    lines = [ln for ln in text.splitlines() if ln.startswith(wanted)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_adapters_stay_consistent_across_replicas(
    engines: list[Engine],
    server_url: str,
    base_model_dir: Path,
    tmp_path: Path,
) -> None:
    first, second = engines
    with fresh_database(server_url) as database_url:
        ops, chat = make_key(database_url, "ops")[1], make_key(database_url, "chat")[1]
        env = {
            "DATABASE_URL": database_url,
            "RATCHET_DATA_DIR": str(tmp_path / "data"),
            "RATCHET_BASE_MODEL": str(base_model_dir),
            "RATCHET_ENGINE_URLS": f"{first.url},{second.url}",
            "RATCHET_ENGINE_CHECK_INTERVAL_S": "0.5",
        }
        lora = make_lora(base_model_dir, tmp_path / "data" / "imports" / "lora", seed=11)
        gateway = start_gateway(env, tmp_path / "gateway.log")
        try:
            for engine in engines:
                engine.wait_healthy()
            wait_for(lambda: all(r["ready"] for r in engines_view(gateway, ops).values()), 60)
            check_consistency(gateway, engines, ops, chat, database_url, lora)
        finally:
            assert gateway.stop() == 0, gateway.log()


def check_consistency(
    gateway: Gateway,
    engines: list[Engine],
    ops: str,
    chat: str,
    database_url: str,
    lora: Path,
) -> None:
    first, second = engines
    base_answer = ask(gateway, chat)
    registered = register_adapter(gateway, ops, lora)
    assert registered.status_code == 201, registered.text
    name = registered.json()["engine_name"]
    body = {"adapter": name, "force": True, "reason": "replica test"}
    promoted = httpx.post(
        gateway.url + "/v1/admin/promotions", headers=auth(ops), timeout=120, json=body
    )
    assert promoted.status_code == 201, promoted.text
    assert all(name in engine.adapters() for engine in engines)  # loaded on each replica
    view = engines_view(gateway, ops)
    assert set(view) == {first.url, second.url}
    assert all(r["ready"] and name in r["adapters"] and not r["missing"] for r in view.values())

    time.sleep(Settings().registry_cache_seconds + 0.2)
    answer = ask(gateway, chat)
    assert answer != base_answer  # production answers through the adapter

    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def traffic() -> None:  # a client that keeps asking all through the restart
        while not stop.is_set():
            response = httpx.post(gateway.url + "/v1/chat/completions", headers=auth(chat),
                                  json={"model": "production", **GREEDY}, timeout=120)  # fmt: skip
            body = response.json()
            text = body["choices"][0]["message"]["content"] if response.status_code == 200 else ""
            results.append((response.status_code, text or str(body)))
            stop.wait(0.5)  # a steady client, not a load test

    client = threading.Thread(target=traffic)
    client.start()
    try:
        second.kill()
        wait_for(lambda: not engines_view(gateway, ops)[second.url]["ready"], 30)
        with pytest.raises(httpx.TransportError):  # it is really gone
            second.adapters()
        second.start()
        second.wait_healthy()
        # Between healthy and ready the gateway loads production; it must never call
        # the replica ready while the engine lacks the adapter.
        deadline = time.monotonic() + 120
        while not engines_view(gateway, ops)[second.url]["ready"]:
            assert time.monotonic() < deadline, gateway.log()
            time.sleep(0.2)
        assert name in second.adapters()
        # Until the restarted replica has answered through the adapter, and the client
        # has had a few answers more.
        served, ready_at = len(results), query(database_url, "SELECT now() AS t")[0]["t"]
        wait_for(lambda: answered_by(database_url, second.url, ready_at) > 0, 180)
        wait_for(lambda: len(results) >= served + 3, 180)
    finally:
        stop.set()
        client.join(timeout=180)

    assert results and all(status == 200 for status, _ in results), results
    assert {text for _, text in results} == {answer}  # every answer from the adapter
    view = engines_view(gateway, ops)
    assert view[second.url]["restarts"] == 1 and view[second.url]["ready"]
    assert loads(gateway, second.url, "reconcile") >= 1  # reloaded before taking requests
    assert loads(gateway, second.url, "request") == 0  # never routed to it without it
    rows = query(
        database_url,
        "SELECT engine_url, output, adapter_sha256 FROM completions WHERE public_model ="
        " 'production' AND adapter_sha256 IS NOT NULL",
    )
    by_engine = {r["engine_url"] for r in rows}
    assert by_engine == {first.url, second.url}  # both replicas served, after the restart too
    assert {r["output"] for r in rows} == {answer}


def answered_by(database_url: str, url: str, since: datetime) -> int:
    """Answers from production's adapter that `url` gave to requests made since then."""
    rows = query(
        database_url,
        "SELECT count(*) AS n FROM completions WHERE engine_url = %s AND created_at > %s"
        " AND public_model = 'production' AND adapter_sha256 IS NOT NULL",
        url,
        since,
    )
    return int(rows[0]["n"])


def ask(gateway: Gateway, key: str) -> str:
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=auth(key),
                          json={"model": "production", **GREEDY}, timeout=120)  # fmt: skip
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_headless_service_addresses_become_replicas() -> None:
    """With dns discovery, each address of the name is a replica, looked up each pass."""
    answers = {"engines.ratchet.svc": ["127.0.0.2", "127.0.0.3"]}

    async def resolve(host: str) -> list[str]:  # the DNS server: an outside boundary
        return answers[host]

    async def scenario() -> tuple[set[str], set[str], bool]:
        port = free_port()
        engines = EngineSet([f"http://engines.ratchet.svc:{port}"], Metrics(), discover=True,
                            resolve=resolve)  # fmt: skip
        await engines.reconcile([])
        found = set(engines.replicas)
        answers["engines.ratchet.svc"] = ["127.0.0.3"]
        await engines.reconcile([])
        later = set(engines.replicas)
        any_ready = any(r.ready for r in engines.replicas.values())  # nothing listens there
        await engines.aclose()
        return found, later, any_ready

    found, later, any_ready = asyncio.run(scenario())
    port = next(iter(later)).rsplit(":", 1)[1]
    assert found == {f"http://127.0.0.2:{port}", f"http://127.0.0.3:{port}"}
    assert later == {f"http://127.0.0.3:{port}"}
    assert not any_ready
