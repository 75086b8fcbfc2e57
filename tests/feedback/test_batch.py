"""`POST /v1/feedback/batch` through the real gateway: each item is checked as the
single call checks it (same status, same error body), a bad item refuses only itself,
and a bad envelope refuses the whole call with nothing stored."""

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ratchet import keys
from tests.helpers import Gateway, auth, counts, make_key, query

QUESTION = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def key(database_url: str) -> tuple[str, str]:
    return make_key(database_url, "chat", "batch-product", limits=keys.Limits(rpm=10_000))


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=120) as client:
        yield client


def answer(http: httpx.Client, secret: str, user: str | None = "ann") -> dict[str, Any]:
    body = {"model": "production", "messages": QUESTION, "max_tokens": 1, "user": user}
    reply = http.post("/v1/chat/completions", headers=auth(secret), json=body)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def batch(http: httpx.Client, secret: str | None, votes: Any) -> httpx.Response:
    headers = auth(secret) if secret else {}
    return http.post("/v1/feedback/batch", headers=headers, json={"votes": votes})


def stored(database_url: str, completion_id: str) -> list[dict[str, Any]]:
    return query(
        database_url,
        "SELECT end_user, rating, comment FROM votes WHERE completion_id = %s",
        uuid.UUID(completion_id.removeprefix("chatcmpl-")),
    )


def test_a_batch_stores_every_vote_and_answers_as_single_calls_do(
    http: httpx.Client, key: tuple[str, str], database_url: str
) -> None:
    a, b = answer(http, key[1]), answer(http, key[1], user=None)
    votes = [
        {"completion_id": a["id"], "rating": "up", "comment": "good", "user": "ann"},
        {"completion_id": b["id"], "rating": "down"},
    ]
    reply = batch(http, key[1], votes)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-ratelimit-limit-requests"] == "10000"
    body = reply.json()
    assert body["object"] == "list"
    first, second = body["data"]
    assert first == {
        "index": 0,
        "status": 200,
        "object": "feedback",
        "completion_id": a["id"],
        "rating": "up",
        "user": "ann",
        "comment": "good",
        "correction": None,
        "updated": False,
    }
    assert (second["index"], second["status"], second["user"]) == (1, 200, None)
    assert stored(database_url, a["id"]) == [{"end_user": "ann", "rating": 1, "comment": "good"}]
    assert stored(database_url, b["id"]) == [{"end_user": "", "rating": -1, "comment": None}]
    # The single call says the same of a repeat as the batch does of its item.
    single = http.post("/v1/feedback", headers=auth(key[1]), json={**votes[1], "rating": "up"})
    again = batch(http, key[1], [{**votes[1], "rating": "up"}]).json()["data"][0]
    assert again == {"index": 0, "status": 200, **single.json()}
    assert again["updated"] is True


def test_bad_items_get_the_single_calls_error_and_good_ones_are_stored(
    http: httpx.Client, key: tuple[str, str], database_url: str
) -> None:
    a, b = answer(http, key[1]), answer(http, key[1])
    other_key = make_key(database_url, "chat", "another-product")[1]
    bad = [
        {"completion_id": a["id"], "rating": "sideways"},
        {"completion_id": a["id"], "rating": "up", "stars": 5},
        {"completion_id": a["id"], "rating": "up", "user": "mallory"},
        {"completion_id": "chatcmpl-" + str(uuid.uuid4()), "rating": "up"},
        {"completion_id": "not-an-id", "rating": "up"},
        {"completion_id": a["id"], "rating": "up", "correction": "x" * 8001},
        {"completion_id": a["id"], "rating": "up", "feedback_token": "ft1.forged"},
        "not an object",
    ]
    good = [
        {"completion_id": a["id"], "rating": "down", "comment": "meh"},
        {"completion_id": b["id"], "rating": "up"},
    ]
    items = [bad[0], good[0], *bad[1:4], good[1], *bad[4:]]
    before = counts(database_url)["votes"]
    reply = batch(http, key[1], items)
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [d["index"] for d in data] == list(range(len(items)))
    for item, result in zip(items, data, strict=True):
        if item in good:
            assert result["status"] == 200, result
            continue
        single = http.post("/v1/feedback", headers=auth(key[1]), json=item)
        assert result == {"index": result["index"], "status": single.status_code, **single.json()}
    statuses = [d["status"] for d in data]
    assert statuses == [400, 200, 400, 403, 404, 200, 404, 400, 401, 400]
    assert counts(database_url)["votes"] == before + 2
    assert stored(database_url, a["id"]) == [{"end_user": "ann", "rating": -1, "comment": "meh"}]
    # Another key's answers do not exist for it: each item is a 404, nothing stored.
    reply = batch(http, other_key, good)
    assert [d["status"] for d in reply.json()["data"]] == [404, 404]
    assert {d["error"]["code"] for d in reply.json()["data"]} == {"completion_not_found"}
    assert counts(database_url)["votes"] == before + 2


def test_a_repeat_within_a_batch_replaces_and_feedback_tokens_vote_without_a_key(
    http: httpx.Client, key: tuple[str, str], database_url: str
) -> None:
    a = answer(http, key[1])
    votes = [
        {"completion_id": a["id"], "rating": "up", "feedback_token": a["feedback_token"]},
        {"completion_id": a["id"], "rating": "down", "feedback_token": a["feedback_token"]},
    ]
    data = batch(http, None, votes).json()["data"]
    assert [(d["status"], d["rating"], d["updated"]) for d in data] == [
        (200, "up", False),
        (200, "down", True),
    ]
    assert stored(database_url, a["id"]) == [{"end_user": "ann", "rating": -1, "comment": None}]
    # An item without a token needs the key: without one, the call is a 401.
    reply = batch(http, None, [{"completion_id": a["id"], "rating": "up"}])
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize(
    "body",
    [
        {"votes": []},
        {"votes": "all of them"},
        {"ballots": []},
        {"votes": [], "extra": 1},
        [],
    ],
)
def test_a_malformed_envelope_is_a_400_and_stores_nothing(
    http: httpx.Client, key: tuple[str, str], database_url: str, body: Any
) -> None:
    before = counts(database_url)["votes"]
    reply = http.post("/v1/feedback/batch", headers=auth(key[1]), json=body)
    assert reply.status_code == 400, reply.text
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert counts(database_url)["votes"] == before


def test_over_100_votes_is_a_400_and_stores_nothing(
    http: httpx.Client, key: tuple[str, str], database_url: str
) -> None:
    a = answer(http, key[1])
    votes = [{"completion_id": a["id"], "rating": "up"}] * 101
    before = counts(database_url)["votes"]
    reply = batch(http, key[1], votes)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "votes"
    assert counts(database_url)["votes"] == before
    assert batch(http, key[1], votes[:100]).status_code == 200
    assert counts(database_url)["votes"] == before + 1  # a hundred times one voter's vote
