"""The feedback token, through the real gateway: every answer (plain, streamed) and
comparison carries one; it votes without the API key, as the answer's owner, on that
one answer only, and is refused when expired or tampered with."""

import base64
import json
import time
import uuid
from typing import Any

import httpx
import pytest

from ratchet import keys
from ratchet.settings import Settings
from serve.tokens import FeedbackTokens, Grant
from tests.helpers import Gateway, auth, make_key, query

QUESTION = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def key(database_url: str) -> tuple[str, str]:
    return make_key(database_url, "chat", "browser-product", limits=keys.Limits(rpm=10_000))


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> Any:
    with httpx.Client(base_url=gateway.url, timeout=120) as client:
        yield client


def answer(http: httpx.Client, key: str, user: str | None = "dora") -> dict[str, Any]:
    body = {"model": "production", "messages": QUESTION, "max_tokens": 4, "user": user}
    reply = http.post("/v1/chat/completions", headers=auth(key), json=body)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def thumbs(http: httpx.Client, completion_id: str, token: str, **body: Any) -> httpx.Response:
    """A vote as a browser sends it: the token, no Authorization header."""
    return http.post(
        "/v1/feedback",
        json={"completion_id": completion_id, "rating": "up", "feedback_token": token, **body},
    )


def votes_on(database_url: str, completion_id: str) -> list[dict[str, Any]]:
    return query(
        database_url,
        "SELECT key_id::text, end_user, rating FROM votes WHERE completion_id = %s",
        uuid.UUID(completion_id.removeprefix("chatcmpl-")),
    )


def code_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return str(response.json()["error"]["code"])


def test_a_token_votes_on_its_own_answer_as_its_owner_and_a_repeat_replaces_it(
    http: httpx.Client, key: tuple[str, str], database_url: str
) -> None:
    reply = answer(http, key[1])
    token = reply["feedback_token"]
    first = thumbs(http, reply["id"], token)
    assert first.status_code == 200, first.text
    assert (first.json()["user"], first.json()["updated"]) == ("dora", False)
    again = thumbs(http, reply["id"], token, rating="down")
    assert again.status_code == 200 and again.json()["updated"] is True
    assert votes_on(database_url, reply["id"]) == [
        {"key_id": key[0], "end_user": "dora", "rating": -1}
    ]
    # The token acts for the owner only, whatever user the browser names.
    assert code_of(thumbs(http, reply["id"], token, user="mallory"), 403) == "not_answer_owner"
    assert len(votes_on(database_url, reply["id"])) == 1


def test_a_token_is_refused_for_another_answer(
    http: httpx.Client, key: tuple[str, str], database_url: str
) -> None:
    one, other = answer(http, key[1]), answer(http, key[1])
    assert code_of(thumbs(http, other["id"], one["feedback_token"]), 401) == (
        "invalid_feedback_token"
    )
    # A completion's token does not decide a comparison either.
    choice = http.post(
        f"/v1/comparisons/cmp-{uuid.UUID(one['id'].removeprefix('chatcmpl-')).hex}/choice",
        json={"choice": "a", "feedback_token": one["feedback_token"]},
    )
    assert code_of(choice, 401) == "invalid_feedback_token"
    assert votes_on(database_url, other["id"]) == []


def test_an_expired_or_tampered_token_is_refused(
    http: httpx.Client, key: tuple[str, str], database_url: str
) -> None:
    reply = answer(http, key[1])
    completion = uuid.UUID(reply["id"].removeprefix("chatcmpl-"))
    # Signed with the gateways' own secret (kept in the database), expired 5 s ago.
    (row,) = query(database_url, "SELECT value FROM server_secrets WHERE name = 'feedback_tokens'")
    signer = FeedbackTokens(bytes(row["value"]), ttl_s=60)
    expired = signer.sign(Grant("completion", completion, uuid.UUID(key[0]), int(time.time()) - 5))
    assert code_of(thumbs(http, reply["id"], expired), 401) == "feedback_token_expired"
    fresh = signer.sign(Grant("completion", completion, uuid.UUID(key[0]), int(time.time()) + 60))
    assert thumbs(http, reply["id"], fresh).status_code == 200  # the same secret, unexpired
    query(database_url, "DELETE FROM votes WHERE completion_id = %s RETURNING id", completion)

    token = reply["feedback_token"]
    prefix, payload, mac = token.split(".")
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    # The same signature over a later expiry: the payload no longer matches it.
    kind, id_hex, key_hex, expires = _unb64(payload).decode().split(":")
    later = base64.urlsafe_b64encode(f"{kind}:{id_hex}:{key_hex}:{int(expires) + 10**6}".encode())
    for bad in (
        f"{prefix}.{payload}.{flipped}",
        f"{prefix}.{later.rstrip(b'=').decode()}.{mac}",
        token[:-1],
        "ft1.not-base64!.x",
        "garbage",
    ):
        assert code_of(thumbs(http, reply["id"], bad), 401) == "invalid_feedback_token", bad
    assert votes_on(database_url, reply["id"]) == []


def test_streamed_answers_and_comparisons_carry_a_token(
    http: httpx.Client, key: tuple[str, str], database_url: str
) -> None:
    body = {"model": "production", "messages": QUESTION, "max_tokens": 4, "stream": True}
    with http.stream(
        "POST", "/v1/chat/completions", headers=auth(key[1]), json={**body, "user": "finn"}
    ) as stream:
        chunks = [
            json.loads(line[6:])
            for line in stream.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    assert "feedback_token" in chunks[0]
    assert not any("feedback_token" in c for c in chunks[1:])  # once, on the first chunk
    voted = thumbs(http, chunks[0]["id"], chunks[0]["feedback_token"])
    assert voted.status_code == 200 and voted.json()["user"] == "finn", voted.text

    created = http.post(
        "/v1/comparisons",
        headers=auth(key[1]),
        json={"messages": QUESTION, "max_tokens": 4, "user": "gus"},
    )
    assert created.status_code == 200, created.text
    comparison = created.json()
    chosen = http.post(
        f"/v1/comparisons/{comparison['id']}/choice",
        json={"choice": "b", "feedback_token": comparison["feedback_token"]},
    )
    assert chosen.status_code == 200, chosen.text
    row = query(
        database_url,
        "SELECT choice, chooser, chooser_key_id::text FROM comparisons WHERE id = %s",
        uuid.UUID(comparison["id"].removeprefix("cmp-")),
    )
    assert row == [{"choice": "b", "chooser": "gus", "chooser_key_id": key[0]}]
    # A comparison's token is not a vote on an answer.
    completion = f"chatcmpl-{uuid.UUID(comparison['id'].removeprefix('cmp-')).hex}"
    assert code_of(thumbs(http, completion, comparison["feedback_token"]), 401) == (
        "invalid_feedback_token"
    )


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_a_revoked_keys_tokens_take_no_more_votes(http: httpx.Client, database_url: str) -> None:
    key_id, secret = make_key(database_url, "chat", "revoked product")
    reply = answer(http, secret)
    assert thumbs(http, reply["id"], reply["feedback_token"]).status_code == 200
    query(database_url, "UPDATE api_keys SET revoked_at = now() WHERE id = %s RETURNING id", key_id)
    time.sleep(Settings().auth_cache_seconds + 0.5)  # every gateway's cache has expired
    refused = thumbs(http, reply["id"], reply["feedback_token"], rating="down")
    assert code_of(refused, 401) == "invalid_feedback_token"
    assert "revoked" in refused.json()["error"]["message"]
    assert [v["rating"] for v in votes_on(database_url, reply["id"])] == [1]
