"""Engines fail: one replica hangs (SIGSTOP), one dies mid-stream (SIGKILL), one hangs
during a promotion; and a report goes stale when production changes under it."""

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ratchet.registry import Adapter
from tests.chaos.conftest import ThrowawayPostgres, chaos_env, report, serve
from tests.chaos.load import Load, check_stored, unfinished
from tests.chaos.test_gateway import stream
from tests.helpers import Engine, Gateway, auth, query, wait_for
from tests.serve.test_report_page import report as minimal_report

pytestmark = [pytest.mark.disruptive, pytest.mark.timeout(900)]


def engines_view(gateway: Gateway, ops: str) -> dict[str, dict[str, Any]]:
    response = httpx.get(gateway.url + "/v1/admin/engines", headers=auth(ops), timeout=10)
    assert response.status_code == 200, response.text
    return {r["url"]: r for r in response.json()["data"]}


def post(
    gateway: Gateway, path: str, key: str, body: object = None
) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(gateway.url + path, headers=auth(key), json=body, timeout=120)
    return response, time.monotonic() - started


def served_by(database_url: str, url: str) -> int:
    rows = query(database_url, "SELECT count(*) AS n FROM completions WHERE engine_url = %s", url)
    return int(rows[0]["n"])


def passed_evaluation(database_url: str, adapter: Adapter) -> int:
    """A finished, passing evaluation of `adapter` against the production of now, with a
    minimal report (the gate itself is tested in tests/eval)."""
    evaluation_id = int(
        query(
            database_url,
            "INSERT INTO evaluations (adapter_id, status, decision, reasons, finished_at,"
            " production_id) VALUES (%s, 'succeeded', 'pass', '[]', now(),"
            " (SELECT to_adapter_id FROM promotions ORDER BY id DESC LIMIT 1)) RETURNING id",
            adapter.id,
        )[0]["id"]
    )
    shown = minimal_report().model_copy(update={"evaluation_id": evaluation_id})
    query(database_url, "UPDATE evaluations SET report = %s WHERE id = %s RETURNING id",
          shown.model_dump_json(), evaluation_id)  # fmt: skip
    return evaluation_id


def test_a_frozen_replica_is_left_within_the_timeouts_and_comes_back(
    pg: ThrowawayPostgres,
    keys: dict[str, str],
    engine_pair: list[Engine],
    base_model_dir: Path,
    chaos_data: Path,
) -> None:
    first, second = engine_pair
    gateway = serve(chaos_env(pg, chaos_data, base_model_dir, engine_pair), chaos_data / "f.log")
    already = {e.url: served_by(pg.url, e.url) for e in engine_pair}
    load = Load(gateway.url, keys["chat"], threads=6, seed=4).start()
    looks: list[tuple[bool, bool]] = []
    try:
        wait_for(lambda: all(served_by(pg.url, url) >= n + 3 for url, n in already.items()),
                 60, "both replicas to serve")  # fmt: skip
        second.freeze()
        frozen = time.monotonic()
        wait_for(lambda: not engines_view(gateway, keys["ops"])[second.url]["ready"], 10,
                 "the frozen replica to be taken out")  # fmt: skip
        taken_out_in = time.monotonic() - frozen
        while time.monotonic() - frozen < 15:  # the other one is checked on its own
            view = engines_view(gateway, keys["ops"])
            looks.append((view[first.url]["ready"], view[second.url]["ready"]))
            time.sleep(1)
        before_thaw = served_by(pg.url, second.url)
        second.thaw()
        wait_for(lambda: engines_view(gateway, keys["ops"])[second.url]["ready"], 30,
                 "the thawed replica to be ready")  # fmt: skip
        wait_for(lambda: served_by(pg.url, second.url) > before_thaw, 30,
                 "the thawed replica to serve")  # fmt: skip
    finally:
        second.thaw()
        ledger = load.stop()
        assert gateway.stop() == 0, gateway.log()
    lost = check_stored(ledger, pg.url)
    report(ledger.summary("one of 2 engines frozen (SIGSTOP) for 15 s", len(lost)))
    assert not ledger.violations, ledger.violations[:5]
    assert not lost, lost[:10]
    assert taken_out_in < 5
    assert looks and all(a and not b for a, b in looks), looks
    # Requests that were waiting on the frozen replica moved to the other one.
    assert all(status < 500 for status in ledger.statuses), ledger.statuses
    cut = [o for o in ledger.streams.values() if o.startswith("error")]
    assert set(cut) <= {"error:engine_timeout", "error:engine_unavailable"}, cut
    assert served_by(pg.url, second.url) > before_thaw  # back in rotation
    assert unfinished(pg.url)["streaming"] == 0


def test_a_promotion_while_a_replica_hangs_fails_in_time_and_blocks_nothing(
    pg: ThrowawayPostgres,
    keys: dict[str, str],
    engine_pair: list[Engine],
    adapters: list[Adapter],
    base_model_dir: Path,
    chaos_data: Path,
) -> None:
    first, second = engine_pair
    current, hoped = adapters
    gateway = serve(chaos_env(pg, chaos_data, base_model_dir, engine_pair), chaos_data / "p.log")
    promotion: dict[str, Any] = {}
    try:
        promoted, _ = post(gateway, "/v1/admin/promotions", keys["ops"],
                           {"adapter": str(current.id), "force": True})  # fmt: skip
        assert promoted.status_code == 201, promoted.text
        to_reject = passed_evaluation(pg.url, hoped)
        second.freeze()

        def promote() -> None:
            promotion["response"], promotion["took"] = post(
                gateway, "/v1/admin/promotions", keys["ops"],
                {"adapter": str(hoped.id), "force": True},
            )  # fmt: skip

        attempt = threading.Thread(target=promote)
        attempt.start()
        time.sleep(0.5)  # the promotion is now waiting on the hung replica
        rolled, rollback_took = post(gateway, "/v1/admin/rollback", keys["ops"],
                                     {"reason": "meanwhile"})  # fmt: skip
        rejected, reject_took = post(
            gateway, f"/v1/admin/evaluations/{to_reject}/reject", keys["reviewer"]
        )
        chats = [
            post(gateway, "/v1/chat/completions", keys["chat"],
                 {"model": "production", "max_tokens": 8,
                  "messages": [{"role": "user", "content": "Hi"}]})
            for _ in range(3)
        ]  # fmt: skip
        attempt.join(timeout=60)
    finally:
        second.thaw()
        assert gateway.stop() == 0, gateway.log()
    refused = promotion["response"]
    report({"fault": "promotion while one of 2 engines hangs", "sent": 6,
            "2xx": sum(r.status_code < 300 for r, _ in [(rolled, 0), (rejected, 0), *chats]),
            "503": 0, "other": int(refused.status_code >= 300), "no_response": 0,
            "lost": 0})  # fmt: skip
    assert refused.status_code == 504, refused.text
    assert refused.json()["error"]["code"] == "engine_timeout"
    assert promotion["took"] < 5 + 3  # the admin timeout, plus the work before it
    assert rolled.status_code == 201 and rollback_took < 3, rolled.text
    assert rejected.status_code == 200 and reject_took < 3, rejected.text
    assert all(r.status_code == 200 and took < 10 for r, took in chats), chats
    production = query(pg.url, "SELECT to_adapter_id FROM promotions ORDER BY id DESC LIMIT 1")
    assert production[0]["to_adapter_id"] is None  # the rollback stands; nothing else switched


def test_approving_a_report_made_against_an_older_production_is_refused(
    pg: ThrowawayPostgres,
    keys: dict[str, str],
    engine_pair: list[Engine],
    adapters: list[Adapter],
    base_model_dir: Path,
    chaos_data: Path,
) -> None:
    current, hoped = adapters
    gateway = serve(chaos_env(pg, chaos_data, base_model_dir, engine_pair[:1]),
                    chaos_data / "s.log")  # fmt: skip
    try:
        stale = passed_evaluation(pg.url, hoped)
        promoted, _ = post(gateway, "/v1/admin/promotions", keys["ops"],
                           {"adapter": str(current.id), "force": True})  # fmt: skip
        assert promoted.status_code == 201, promoted.text
        switches = len(query(pg.url, "SELECT id FROM promotions"))
        approved, _ = post(gateway, f"/v1/admin/evaluations/{stale}/approve", keys["reviewer"])
        after = len(query(pg.url, "SELECT id FROM promotions"))
        review = query(pg.url, "SELECT review FROM evaluations WHERE id = %s", stale)[0]
        body = {"adapter": str(hoped.id), "force": True, "reason": "ops knows"}
        page = httpx.get(f"{gateway.url}/reports/{stale}", headers=auth(keys["reviewer"]))
        again = httpx.post(f"{gateway.url}/reports/{stale}/reevaluate",
                           headers=auth(keys["reviewer"]))  # fmt: skip
        queued = query(pg.url, "SELECT id, production_id FROM evaluations WHERE status ="
                       " 'queued' AND adapter_id = %s", hoped.id)  # fmt: skip
        jobs = query(pg.url, "SELECT args FROM procrastinate_jobs WHERE status = 'todo'")
        query(pg.url, "DELETE FROM procrastinate_jobs RETURNING id")  # no worker runs here
        query(pg.url, "UPDATE evaluations SET status = 'failed' WHERE status = 'queued'"
              " RETURNING id")  # fmt: skip
        forced, _ = post(gateway, "/v1/admin/promotions", keys["ops"], body)
        audit = query(pg.url, "SELECT detail FROM audit ORDER BY id DESC LIMIT 1")[0]["detail"]
        for _ in range(2):  # leave production as it was: the base
            assert post(gateway, "/v1/admin/rollback", keys["ops"])[0].status_code == 201
    finally:
        assert gateway.stop() == 0, gateway.log()
    report({"fault": "approving a stale evaluation", "sent": 1, "2xx": 0, "503": 0,
            "other": int(approved.status_code >= 300), "no_response": 0,
            "lost": 0})  # fmt: skip
    assert approved.status_code == 409, approved.text
    error = approved.json()["error"]
    assert error["code"] == "evaluation_stale" and "force=true" in error["message"], error
    assert after == switches and review["review"] is None  # nothing changed
    # The page says so, offers no Approve, and "Evaluate again" queues a new evaluation
    # (row first, then its job) and leads to its page.
    assert page.status_code == 200 and 'id="stale"' in page.text
    assert 'id="approve"' not in page.text
    assert again.status_code == 303 and len(queued) == 1, again.text
    assert again.headers["location"] == f"/reports/{queued[0]['id']}"
    assert [j["args"]["evaluation_id"] for j in jobs] == [queued[0]["id"]]
    assert forced.status_code == 201, forced.text
    assert audit["overrode"] == "evaluation_stale"  # the forced promotion says what it overrode


@pytest.mark.leaves_a_replica_dead  # the next test to need it starts it again
def test_an_engine_killed_mid_stream_ends_its_streams_with_an_error_event(
    pg: ThrowawayPostgres,
    keys: dict[str, str],
    engine_pair: list[Engine],
    base_model_dir: Path,
    chaos_data: Path,
) -> None:
    first, second = engine_pair
    gateway = serve(chaos_env(pg, chaos_data, base_model_dir, engine_pair), chaos_data / "k.log")
    seen: list[dict[str, Any]] = [{} for _ in range(6)]
    clients = [
        threading.Thread(target=stream, args=(gateway.url, keys["chat"], 128, out)) for out in seen
    ]
    try:
        for client in clients:
            client.start()
        wait_for(lambda: all("id" in s for s in seen), 60, "every stream to start")
        time.sleep(0.5)
        second.kill()
        for client in clients:
            client.join(timeout=120)
        ids = [s["id"].split("-", 1)[1] for s in seen]

        def ended() -> list[dict[str, Any]]:  # the aborted rows are written as streams end
            return query(pg.url, "SELECT id::text, status, output, engine_url FROM completions"
                         " WHERE id = ANY(%s::uuid[]) AND status <> 'streaming'", ids)  # fmt: skip

        wait_for(lambda: len(ended()) == len(ids), 10, "every stream's row to be written")
        rows = {r["id"].replace("-", ""): r for r in ended()}
    finally:
        assert gateway.stop() == 0, gateway.log()
    on = {s["id"]: rows[s["id"].split("-", 1)[1]] for s in seen}
    killed = [s for s in seen if on[s["id"]]["engine_url"] == second.url]
    kept = [s for s in seen if on[s["id"]]["engine_url"] == first.url]
    lost = [s["id"] for s in seen if on[s["id"]]["output"] != s["text"]]
    report({"fault": "an engine killed (SIGKILL) mid-stream", "sent": len(seen),
            "2xx": len(seen), "503": 0, "other": 0,
            "no_response": sum(s["outcome"] == "broken" for s in seen),
            "lost": len(lost)})  # fmt: skip
    assert killed and kept, on
    for s in killed:
        assert s["outcome"] == "error", s
        assert s["error"]["code"] in ("engine_unavailable", "engine_timeout"), s
        assert on[s["id"]]["status"] == "aborted"
    assert all(s["outcome"] == "done" and on[s["id"]]["status"] == "complete" for s in kept)
    assert not lost, lost  # every row holds exactly what its client was sent
    assert unfinished(pg.url) == {
        "streaming": 0,
        "evaluations_without_job": 0,
        "runs_without_job": 0,
    }
