"""Quotas: requests, tokens and concurrency per key, the gateway's in-flight cap and
failed-authentication throttling. Over a limit: 429 with Retry-After, OpenAI's body
and x-ratelimit-* headers; other keys are answered meanwhile."""

import asyncio
import gc
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from starlette.requests import ClientDisconnect
from starlette.types import Message

from ratchet import keys
from ratchet.db import make_pool
from ratchet.keys import ApiKey, Limits
from ratchet.settings import Settings
from serve.app import create_app
from serve.auth import Authenticator
from serve.errors import TooManyRequests, Unauthorized
from serve.quotas import Quotas, ReleasingStream, duration, tokens_wait
from tests.helpers import Gateway, auth, make_key, query, wait_until_ended

HI = [{"role": "user", "content": "Hi"}]
COUNT = [{"role": "user", "content": "Count from 1 to 200, separated by commas."}]
HEADERS = [
    f"x-ratelimit-{part}-{kind}"
    for kind in ("requests", "tokens")
    for part in ("limit", "remaining", "reset")
]


def cost(messages: list[dict[str, str]], max_tokens: int) -> int:
    """The documented estimate: a quarter of the messages' UTF-8 JSON bytes, rounded
    up, plus max_tokens."""
    return math.ceil(len(json.dumps(messages, ensure_ascii=False).encode()) / 4) + max_tokens


def chat(gateway: Gateway, secret: str, **body: Any) -> httpx.Response:
    payload = {"model": "base", "messages": HI, "max_tokens": 4, **body}
    return httpx.post(
        gateway.url + "/v1/chat/completions", json=payload, headers=auth(secret), timeout=120
    )


def assert_refused(response: httpx.Response, limit_words: str) -> dict[str, Any]:
    """A 429 in OpenAI's shape, naming the limit, with Retry-After and the headers."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    assert limit_words in error["message"], error["message"]
    assert 1 <= int(response.headers["retry-after"]) <= 120
    assert all(h in response.headers for h in HEADERS), dict(response.headers)
    return dict(error)


def assert_answered(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def completions_of(database_url: str, key_id: str) -> int:
    rows = query(database_url, "SELECT count(*) AS n FROM completions WHERE key_id = %s", key_id)
    return int(rows[0]["n"])


def test_requests_per_minute(
    gateway: Gateway, database_url: str, chat_key: tuple[str, str]
) -> None:
    key_id, secret = make_key(database_url, "chat", "rpm", Limits(rpm=3))
    for remaining in (2, 1, 0):
        listed = httpx.get(gateway.url + "/v1/models", headers=auth(secret), timeout=30)
        assert listed.status_code == 200
        assert listed.headers["x-ratelimit-limit-requests"] == "3"
        assert listed.headers["x-ratelimit-remaining-requests"] == str(remaining)
    refused = chat(gateway, secret)
    error = assert_refused(refused, "requests per min (RPM)")
    assert "Limit 3" in error["message"]
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert completions_of(database_url, key_id) == 0  # refused before the engine
    # Another key is answered while this one is refused.
    assert_answered(chat(gateway, chat_key[1]))
    assert chat(gateway, secret).status_code == 429
    metrics = httpx.get(gateway.url + "/metrics", timeout=30).text
    assert 'ratchet_rate_limited_total{limit="requests"}' in metrics


def test_tokens_per_minute(gateway: Gateway, database_url: str, chat_key: tuple[str, str]) -> None:
    one = cost(HI, 4)
    key_id, secret = make_key(database_url, "chat", "tpm", Limits(tpm=one + one // 2))
    first = chat(gateway, secret)
    assert_answered(first)
    assert first.headers["x-ratelimit-limit-tokens"] == str(one + one // 2)
    assert first.headers["x-ratelimit-remaining-tokens"] == str(one // 2)
    assert first.headers["x-ratelimit-limit-requests"] == "600"  # the settings' default
    error = assert_refused(chat(gateway, secret), "tokens per min (TPM)")
    assert f"Requested {one}" in error["message"]
    assert completions_of(database_url, key_id) == 1
    assert_answered(chat(gateway, chat_key[1]))
    # More than the whole minute's tokens: refused, saying it is too large.
    too_large = chat(gateway, secret, max_tokens=64)
    assert_refused(too_large, "Request too large")


def test_a_comparison_costs_two_answers(gateway: Gateway, database_url: str) -> None:
    one = cost(HI, 4)
    _, secret = make_key(database_url, "chat", "tpm-cmp", Limits(tpm=2 * one))
    compared = httpx.post(
        gateway.url + "/v1/comparisons",
        json={"messages": HI, "max_tokens": 4},
        headers=auth(secret),
        timeout=120,
    )
    assert compared.status_code == 200, compared.text
    assert compared.headers["x-ratelimit-remaining-tokens"] == "0"
    assert_refused(chat(gateway, secret), "tokens per min (TPM)")


def stream(gateway: Gateway, secret: str, max_tokens: int) -> Any:
    body = {"model": "base", "messages": COUNT, "max_tokens": max_tokens, "stream": True}
    return httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json=body,
        headers=auth(secret),
        timeout=120,
    )


def wait_for_slot(gateway: Gateway, secret: str) -> httpx.Response:
    """The key's next request, retried while its slot is still held (released as the
    server notices the end, just after the client does)."""
    for _ in range(100):
        response = chat(gateway, secret, max_tokens=1)
        if response.status_code != 429:
            return response
        assert "concurrent" in response.json()["error"]["message"]
        time.sleep(0.1)
    raise AssertionError("the stream's concurrency slot was never released")


def test_a_stream_holds_its_slot_until_it_ends(
    gateway: Gateway, database_url: str, chat_key: tuple[str, str]
) -> None:
    _, secret = make_key(database_url, "chat", "conc", Limits(concurrency=1))
    with stream(gateway, secret, max_tokens=24) as response:
        assert response.status_code == 200
        assert all(h in response.headers for h in HEADERS)
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert_refused(chat(gateway, secret), "concurrent requests")
        assert_answered(chat(gateway, chat_key[1]))  # another key is answered meanwhile
        assert "data: [DONE]" in list(lines)
    assert wait_for_slot(gateway, secret).status_code == 200


def test_a_client_leaving_early_gives_the_slot_back(gateway: Gateway, database_url: str) -> None:
    _, secret = make_key(database_url, "chat", "conc-leave", Limits(concurrency=1))
    with stream(gateway, secret, max_tokens=256) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert_refused(chat(gateway, secret), "concurrent requests")
    # The client has left mid-answer: the slot comes back, and the answer was cut short.
    assert wait_for_slot(gateway, secret).status_code == 200
    uid = first["id"].removeprefix("chatcmpl-")
    row = wait_until_ended(database_url, uid)
    assert row["status"] == "aborted"


async def _never() -> AsyncIterator[bytes]:
    await asyncio.Event().wait()
    yield b""


def test_a_stream_never_sent_still_gives_its_slot_back() -> None:
    """The client is gone before the first byte (the body never runs), or the response
    is dropped unsent: either way the slot comes back."""
    released: list[str] = []

    async def scenario() -> None:
        async def receive() -> Message:
            return {"type": "http.disconnect"}

        async def send(_: Message) -> None:
            raise OSError("the client has gone")

        response = ReleasingStream(_never(), lambda: released.append("left"))
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        with pytest.raises(ClientDisconnect):
            await asyncio.wait_for(response(scope, receive, send), 5)

    asyncio.run(scenario())
    assert released == ["left"]
    dropped = ReleasingStream(_never(), lambda: released.append("dropped"))
    del dropped
    gc.collect()
    assert released == ["left", "dropped"]


def api_key(**limits: int) -> ApiKey:
    return ApiKey(id=uuid.uuid4(), name="", role="chat", created_at=datetime.now(UTC), **limits)


def test_concurrency_and_the_in_flight_cap() -> None:
    quotas = Quotas(Settings(max_in_flight=3, default_concurrency=2))
    a, b = api_key(), api_key(concurrency=1)

    async def scenario() -> None:
        comparison = await quotas.admit(a, 10, calls=2)  # two engine calls
        single = await quotas.admit(b, 10)
        with pytest.raises(TooManyRequests) as over_cap:
            await quotas.admit(a, 10)  # a has a slot left, the gateway has none
        assert "in flight" in over_cap.value.message
        assert over_cap.value.headers()["Retry-After"] == "1"
        comparison.slot.release()
        comparison.slot.release()  # twice: counted once
        assert quotas.in_flight == 1
        with pytest.raises(TooManyRequests) as over_key:
            await quotas.admit(b, 10)  # b's one slot is taken
        assert "concurrent" in over_key.value.message
        again = await quotas.admit(a, 10)
        single.slot.release()
        again.slot.release()
        assert quotas.in_flight == 0 and quotas.by_key == {}

    asyncio.run(scenario())


def test_duration_and_tokens_wait() -> None:
    assert [duration(s) for s in (0, 0.02, 1, 59.2, 360, 3600)] == [
        "0s",
        "20ms",
        "1s",
        "1m0s",
        "6m0s",
        "1h0m0s",
    ]
    # 1_000_020 is a window's start. 30 s into it, nothing in the previous one, 60 of
    # 100 spent in this one:
    # 50 more fit only once this window's 60 decay to 50: 30 s left + 10 s.
    assert tokens_wait(0, 60, 100, 50, now=1_000_050.0) == pytest.approx(40)
    # 100 spent in the previous window, 0 now, 30 s left: 50 fit when it weighs 50.
    assert tokens_wait(100, 0, 100, 50, now=1_000_050.0) == pytest.approx(0)
    assert tokens_wait(100, 0, 100, 60, now=1_000_050.0) == pytest.approx(6)


@pytest.fixture
def counted(database_url: str) -> Iterator[tuple[Authenticator, list[str], Quotas]]:
    """An Authenticator on a real pool whose key lookups are counted; its throttle
    allows 3 failed authentications a minute per address."""
    lookups: list[str] = []

    async def lookup(conn: psycopg.AsyncConnection, secret: str) -> ApiKey | None:
        lookups.append(secret)
        return await keys.find_active(conn, secret)

    quotas = Quotas(Settings(auth_failures_per_minute=3))
    pool = make_pool(database_url, 2, acquire_timeout=5, connect_timeout=5)
    authenticator = Authenticator(pool, 5.0, throttle=quotas, lookup=lookup)
    yield authenticator, lookups, quotas


def run_with_pool(authenticator: Authenticator, work: Any) -> Any:
    async def scenario() -> Any:
        await authenticator.pool.open()
        try:
            return await work()
        finally:
            await authenticator.pool.close()

    return asyncio.run(scenario())


def test_an_unknown_key_is_looked_up_once(
    counted: tuple[Authenticator, list[str], Quotas], database_url: str
) -> None:
    authenticator, lookups, _ = counted
    authenticator.throttle = None  # this test counts lookups, not failures
    _, good = make_key(database_url, "chat")

    async def work() -> None:
        for _ in range(5):
            with pytest.raises(Unauthorized):
                await authenticator.authenticate("Bearer rk_unknown", "192.0.2.1")
        assert len(lookups) == 1
        key = await authenticator.authenticate(f"Bearer {good}", "192.0.2.1")
        assert key.role == "chat" and len(lookups) == 2
        with pytest.raises(Unauthorized):
            await authenticator.authenticate("Bearer rk_another", "192.0.2.1")
        assert len(lookups) == 3

    run_with_pool(authenticator, work)


def test_failed_authentications_are_throttled_per_address(
    counted: tuple[Authenticator, list[str], Quotas], database_url: str
) -> None:
    authenticator, lookups, _ = counted
    _, good = make_key(database_url, "chat")
    attacker, neighbour = "198.51.100.7", "198.51.100.8"

    async def work() -> None:
        trusted = await authenticator.authenticate(f"Bearer {good}", attacker)
        for i in range(3):
            with pytest.raises(Unauthorized):
                await authenticator.authenticate(f"Bearer rk_guess{i}", attacker)
        looked_up = len(lookups)
        for secret in ("rk_guess3", "rk_guess0"):  # a new guess, a known one
            with pytest.raises(TooManyRequests) as refused:
                await authenticator.authenticate(f"Bearer {secret}", attacker)
            assert "failed authentications" in refused.value.message
            assert 1 <= int(refused.value.headers()["Retry-After"]) <= 60
        assert len(lookups) == looked_up  # no database read while over the limit
        # A key this gateway already trusts still works from there; other addresses
        # are not affected.
        assert (await authenticator.authenticate(f"Bearer {good}", attacker)).id == trusted.id
        with pytest.raises(Unauthorized):
            await authenticator.authenticate("Bearer rk_typo", neighbour)

    run_with_pool(authenticator, work)


@pytest.fixture(scope="module")
def throttled(
    gateway: Gateway, database_url: str, base_model_dir: Path, data_dir: Path
) -> Iterator[TestClient]:
    """The gateway app in-process with 3 failed authentications a minute per address,
    so that the shared gateway's budget for 127.0.0.1 is left alone."""
    settings = Settings(
        database_url=database_url,
        data_dir=data_dir,
        base_model=str(base_model_dir),
        auth_failures_per_minute=3,
    )
    app = create_app(settings, database_url, engine_url=gateway.engine_url)
    with TestClient(app, client=("203.0.113.9", 40000)) as client:
        yield client


def test_failed_auth_over_http_gets_429(throttled: TestClient, database_url: str) -> None:
    for _ in range(3):
        assert throttled.get("/v1/models", headers=auth("rk_wrong")).status_code == 401
    refused = throttled.get("/v1/models", headers=auth("rk_wrong"))
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    _, good = make_key(database_url, "chat")
    # Another address, on the same app and event loop as `throttled`.
    elsewhere = TestClient(throttled.app, client=("203.0.113.10", 40000))
    elsewhere.portal = throttled.portal
    assert elsewhere.get("/v1/models", headers=auth("rk_wrong")).status_code == 401
    assert elsewhere.get("/v1/models", headers=auth(good)).status_code == 200
