"""Promote and roll back through the API: refusals change nothing, switches are atomic
and audited, requests in flight never fail, and a restarted gateway reloads production."""

import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from ratchet.settings import Settings
from tests.helpers import (
    Gateway,
    auth,
    make_lora,
    query,
    register_adapter,
    start_gateway,
)

QUESTION = {
    "messages": [{"role": "user", "content": "Name three colors."}],
    "temperature": 0,
    "max_tokens": 24,
}


def state(database_url: str) -> dict[str, int]:
    """What a refused request must leave unchanged."""
    row = query(
        database_url,
        "SELECT (SELECT count(*) FROM promotions) AS promotions,"
        " (SELECT count(*) FROM audit) AS audit,"
        " (SELECT count(*) FROM evaluations WHERE review IS NOT NULL) AS reviewed",
    )[0]
    return {k: int(v) for k, v in row.items()}


def evaluation(database_url: str, adapter_id: str, decision: str) -> int:
    """A finished evaluation row with the given decision, made against the production
    of now (the gate itself is tested in tests/eval; here only its outcome matters)."""
    return int(
        query(
            database_url,
            "INSERT INTO evaluations (adapter_id, status, decision, reasons, finished_at,"
            " production_id) VALUES (%s, 'succeeded', %s, %s, now(),"
            " (SELECT to_adapter_id FROM promotions ORDER BY id DESC LIMIT 1)) RETURNING id",
            adapter_id,
            decision,
            json.dumps([f"constructed {decision}"]),
        )[0]["id"]
    )


def answer(gateway: Gateway, key: str, model: str = "production") -> str:
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=auth(key),
        timeout=120,
        json={"model": model, **QUESTION},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def post(gateway: Gateway, path: str, key: str, body: object = None) -> httpx.Response:
    return httpx.post(gateway.url + path, headers=auth(key), json=body, timeout=300)


@pytest.fixture(scope="module")
def adapters(
    gateway: Gateway,
    ops_key: tuple[str, str],
    base_model_dir: Path,
    data_dir: Path,
    database_url: str,
) -> Iterator[list[dict[str, str]]]:
    """Two registered LoRAs; production is the base again afterwards."""
    made = []
    for seed in (11, 12):
        path = make_lora(base_model_dir, data_dir / "imports" / f"promo-{seed}", seed=seed)
        response = register_adapter(gateway, ops_key[1], path)
        assert response.status_code == 201, response.text
        made.append(response.json())
    yield made
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE adapters SET status = 'retired' WHERE status <> 'retired'")
        conn.execute("INSERT INTO promotions (to_adapter_id, actor) VALUES (NULL, 'cleanup')")
    time.sleep(Settings().registry_cache_seconds + 0.2)


def test_refusals_are_clear_and_change_nothing(
    gateway: Gateway,
    adapters: list[dict[str, str]],
    ops_key: tuple[str, str],
    reviewer_key: tuple[str, str],
    chat_key: tuple[str, str],
    database_url: str,
) -> None:
    good, bad = adapters
    evaluation(database_url, bad["id"], "fail")
    before = state(database_url)
    refusals = [
        (post(gateway, "/v1/admin/promotions", ops_key[1], {"adapter": bad["sha256"]}), 409,
         "gate_failed"),
        (post(gateway, "/v1/admin/promotions", ops_key[1], {"adapter": good["sha256"]}), 409,
         "not_evaluated"),
        (post(gateway, "/v1/admin/promotions", ops_key[1], {"adapter": "0123456789abcdef"}), 404,
         "adapter_not_found"),
        (post(gateway, "/v1/admin/promotions", ops_key[1], {"adapter": ""}), 400, "invalid_value"),
        (post(gateway, "/v1/admin/promotions", ops_key[1], {"adapter": good["id"], "x": 1}), 400,
         "unsupported_parameter"),
        (post(gateway, "/v1/admin/promotions", reviewer_key[1], {"adapter": good["id"]}), 403,
         "insufficient_role"),
        (post(gateway, "/v1/admin/promotions", chat_key[1], {"adapter": good["id"]}), 403,
         "insufficient_role"),
        (post(gateway, "/v1/admin/evaluations/999999/approve", reviewer_key[1]), 404,
         "evaluation_not_found"),
        (post(gateway, "/v1/admin/evaluations", ops_key[1], {"adapter": "nope"}), 404,
         "adapter_not_found"),
    ]  # fmt: skip
    for response, status, code in refusals:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and error["message"], error
    assert "force=true" in refusals[0][0].json()["error"]["message"]
    assert state(database_url) == before


def test_missing_or_altered_files_are_refused_even_with_force(
    gateway: Gateway,
    adapters: list[dict[str, str]],
    ops_key: tuple[str, str],
    database_url: str,
    tmp_path: Path,
) -> None:
    good = adapters[0]
    path = Path(good["path"])
    before = state(database_url)
    weights = path / "adapter_model.safetensors"
    saved = tmp_path / "weights"
    shutil.copy2(weights, saved)
    try:
        with weights.open("r+b") as f:  # flip one byte of the stored weights
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
        altered = post(
            gateway, "/v1/admin/promotions", ops_key[1], {"adapter": good["id"], "force": True}
        )
        assert altered.status_code == 409 and altered.json()["error"]["code"] == (
            "adapter_hash_mismatch"
        )
        weights.unlink()
        missing = post(
            gateway, "/v1/admin/promotions", ops_key[1], {"adapter": good["id"], "force": True}
        )
        assert missing.status_code == 409, missing.text
        assert missing.json()["error"]["code"] == "adapter_files_missing"
    finally:
        shutil.copy2(saved, weights)
    assert state(database_url) == before


def test_approve_promotes_once_forced_promotion_is_recorded_rollback_walks_back(
    gateway: Gateway,
    adapters: list[dict[str, str]],
    ops_key: tuple[str, str],
    reviewer_key: tuple[str, str],
    chat_key: tuple[str, str],
    database_url: str,
) -> None:
    good, bad = adapters
    base_answer = answer(gateway, chat_key[1], "base")
    passed = evaluation(database_url, good["id"], "pass")
    approved = post(gateway, f"/v1/admin/evaluations/{passed}/approve", reviewer_key[1],
                    {"note": "looks right"})  # fmt: skip
    assert approved.status_code == 200, approved.text
    assert approved.json()["review"] == "approved"
    time.sleep(Settings().registry_cache_seconds + 0.2)
    promoted_answer = answer(gateway, chat_key[1])
    assert promoted_answer != base_answer  # a random LoRA changes the greedy answer

    before = state(database_url)
    twice = post(gateway, f"/v1/admin/evaluations/{passed}/approve", reviewer_key[1])
    assert twice.status_code == 409 and twice.json()["error"]["code"] == "already_reviewed"
    assert "already approved by" in twice.json()["error"]["message"]
    # Rejecting another report of the adapter that is production now would leave
    # production "rejected": refused, roll back instead.
    late = evaluation(database_url, good["id"], "pass")
    rejected = post(gateway, f"/v1/admin/evaluations/{late}/reject", reviewer_key[1])
    assert rejected.status_code == 409, rejected.text
    assert rejected.json()["error"]["code"] == "already_production"
    assert state(database_url) == before

    forced = post(gateway, "/v1/admin/promotions", ops_key[1],
                  {"adapter": bad["sha256"][:12], "force": True, "reason": "hotfix"})  # fmt: skip
    assert forced.status_code == 201, forced.text
    assert forced.json()["forced"] and forced.json()["adapter"]["id"] == bad["id"]
    audit = query(database_url, "SELECT * FROM audit ORDER BY id DESC LIMIT 1")[0]
    assert audit["action"] == "force_promote" and audit["subject"] == bad["sha256"]
    assert "ops" in audit["actor"] and audit["detail"]["reason"] == "hotfix"

    # Roll back twice: to the approved adapter, then to the base; a third has nowhere to go.
    first = post(gateway, "/v1/admin/rollback", ops_key[1], {"reason": "bad answers"})
    assert first.status_code == 201 and first.json()["adapter"]["id"] == good["id"], first.text
    time.sleep(Settings().registry_cache_seconds + 0.2)
    assert answer(gateway, chat_key[1]) == promoted_answer
    second = post(gateway, "/v1/admin/rollback", ops_key[1])
    assert second.status_code == 201 and second.json()["adapter"] is None
    time.sleep(Settings().registry_cache_seconds + 0.2)
    assert answer(gateway, chat_key[1]) == base_answer
    before = state(database_url)
    third = post(gateway, "/v1/admin/rollback", ops_key[1])
    assert third.status_code == 409, third.text
    assert third.json()["error"]["code"] == "no_previous_production"
    assert state(database_url) == before
    actions = [r["action"] for r in query(database_url, "SELECT action FROM audit ORDER BY id")]
    assert actions[-5:] == ["promote", "review_approved", "force_promote", "rollback", "rollback"]


def test_requests_in_flight_survive_promotion_and_rollback(
    gateway: Gateway,
    adapters: list[dict[str, str]],
    ops_key: tuple[str, str],
    chat_key: tuple[str, str],
) -> None:
    results: list[int] = []
    errors: list[str] = []

    def stream() -> None:
        try:
            with httpx.stream(
                "POST",
                gateway.url + "/v1/chat/completions",
                headers=auth(chat_key[1]),
                timeout=300,
                json={"model": "production", "stream": True, **QUESTION, "max_tokens": 64},
            ) as response:
                chunks = [line for line in response.iter_lines() if line.startswith("data:")]
                results.append(response.status_code)
                if chunks[-1] != "data: [DONE]" or '"error"' in "".join(chunks):
                    errors.append(chunks[-1])
        except httpx.HTTPError as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    switched = post(gateway, "/v1/admin/promotions", ops_key[1],
                    {"adapter": adapters[1]["id"], "force": True})  # fmt: skip
    assert switched.status_code == 201, switched.text
    back = post(gateway, "/v1/admin/rollback", ops_key[1])
    assert back.status_code == 201, back.text
    for t in threads:
        t.join(timeout=300)
    assert results == [200] * 8 and not errors, errors


def test_a_restarted_gateway_loads_production_before_it_is_ready(
    gateway: Gateway,
    adapters: list[dict[str, str]],
    ops_key: tuple[str, str],
    gateway_env: dict[str, str],
    data_dir: Path,
) -> None:
    target = adapters[0]
    promoted = post(gateway, "/v1/admin/promotions", ops_key[1],
                    {"adapter": target["id"], "force": True})  # fmt: skip
    assert promoted.status_code == 201, promoted.text
    # The engine forgets the adapter (as after an engine restart)...
    assert gateway.engine_url
    engine = httpx.Client(base_url=gateway.engine_url, timeout=60)
    unloaded = engine.post("/v1/unload_lora_adapter", json={"lora_name": target["engine_name"]})
    assert unloaded.status_code == 200, unloaded.text
    assert target["engine_name"] not in [m["id"] for m in engine.get("/v1/models").json()["data"]]
    # ...and a gateway starting now has loaded it again by the time it says it is ready.
    env = {**gateway_env, "RATCHET_ENGINE_URL": gateway.engine_url}
    second = start_gateway(env, data_dir / f"gateway-{uuid.uuid4().hex[:6]}.log")
    try:
        listed = [m["id"] for m in engine.get("/v1/models").json()["data"]]
        assert target["engine_name"] in listed
        ready = httpx.get(second.url + "/readyz").json()
        assert all(ready["checks"].values()), ready
    finally:
        assert second.stop() == 0
        engine.close()


def test_an_evaluation_is_queued_once_per_adapter(
    gateway: Gateway,
    adapters: list[dict[str, str]],
    ops_key: tuple[str, str],
    reviewer_key: tuple[str, str],
    database_url: str,
) -> None:
    ref = {"adapter": adapters[0]["engine_name"]}
    queued = post(gateway, "/v1/admin/evaluations", ops_key[1], ref)
    assert queued.status_code == 202, queued.text
    body = queued.json()
    assert body["status"] == "queued" and body["report_url"] == f"/reports/{body['id']}"
    job = query(
        database_url,
        "SELECT id FROM procrastinate_jobs WHERE task_name = 'ratchet:evaluate'"
        " AND (args->>'evaluation_id')::bigint = %s",
        body["id"],
    )
    assert len(job) == 1
    again = post(gateway, "/v1/admin/evaluations", ops_key[1], ref)
    assert again.status_code == 409 and again.json()["error"]["code"] == "evaluation_in_progress"
    shown = httpx.get(
        f"{gateway.url}/v1/admin/evaluations/{body['id']}", headers=auth(reviewer_key[1])
    ).json()
    assert shown["status"] == "queued" and shown["report"] is None
    page = httpx.get(f"{gateway.url}/reports/{body['id']}", headers=auth(reviewer_key[1]))
    assert page.status_code == 200 and "is queued" in page.text
    # Leave no work for the workers of later tests.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM procrastinate_jobs WHERE id = %s", (job[0]["id"],))
        conn.execute("UPDATE evaluations SET status = 'failed' WHERE id = %s", (body["id"],))
