"""A chat key tries to stuff the votes, through the real gateway: 1,000 votes on one of
its answers under 1,000 end-user names, and votes and choices on another key's answers.
The names are refused (403), the other key's answers do not exist for it (404, the
body of an unknown id), nothing is stored, and a snapshot has exactly the pairs the
honest votes give. The day cap and the correction cap through the same gateway."""

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.types.json import Jsonb

from feedback.pairs.build import build
from feedback.prompts import prompt_sha256
from ratchet import keys
from ratchet.config import PairSettings
from ratchet.settings import Settings
from tests.helpers import Gateway, auth, make_key, query

ATTACK = 1000
# A generous rate so that the attack meets the vote rules, not the request quota.
FAST = keys.Limits(rpm=100_000)


def chat(
    http: httpx.Client, key: str, question: str, max_tokens: int, user: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "production",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if user is not None:
        body["user"] = user
    reply = http.post("/v1/chat/completions", headers=auth(key), json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def vote(http: httpx.Client, key: str, completion_id: str, **body: Any) -> httpx.Response:
    return http.post(
        "/v1/feedback", headers=auth(key), json={"completion_id": completion_id, **body}
    )


def votes_on(database_url: str, *completion_ids: str) -> list[dict[str, Any]]:
    return query(
        database_url,
        "SELECT completion_id::text, key_id::text, end_user, rating FROM votes"
        " WHERE completion_id = ANY(%s::uuid[]) ORDER BY completion_id, end_user",
        [c.removeprefix("chatcmpl-") for c in completion_ids],
    )


def test_a_stuffing_attack_fails(gateway: Gateway, database_url: str, tmp_path: Path) -> None:
    attacker_id, attacker = make_key(database_url, "chat", "attacker", limits=FAST)
    victim_id, victim = make_key(database_url, "chat", "victim", limits=FAST)
    # One prompt of this test's own, so that its pairs are told apart from the others'.
    question = f"Tell me a long story about a cat named {uuid.uuid4().hex[:6]}."
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        # Different lengths give different texts for one prompt (temperature 0).
        mine = chat(http, attacker, question, 12, "alice")
        anon = chat(http, attacker, question, 4, None)
        theirs = chat(http, victim, question, 8, "carol")
        theirs_cmp = http.post(
            "/v1/comparisons",
            headers=auth(victim),
            json={"messages": [{"role": "user", "content": question}], "max_tokens": 4},
            timeout=120,
        )
        assert theirs_cmp.status_code == 200, theirs_cmp.text

        # The honest votes: each answer's own end user (or, without one, its key).
        honest = [
            vote(http, attacker, mine["id"], rating="down", user="alice"),
            vote(http, attacker, mine["id"], rating="up", user="alice"),  # replaces it
            vote(http, attacker, anon["id"], rating="down"),
            vote(http, victim, theirs["id"], rating="down", user="carol"),
        ]
        assert [r.status_code for r in honest] == [200] * 4, [r.text for r in honest]
        assert honest[1].json()["updated"] is True

        # The attack: 1,000 end-user names on one answer, from one keep-alive client.
        def stuff(i: int) -> httpx.Response:
            return vote(http, attacker, mine["id"], rating="down", user=f"u{i}")

        with ThreadPoolExecutor(8) as pool:
            stuffed = list(pool.map(stuff, range(ATTACK)))
        assert {r.status_code for r in stuffed} == {403}
        error = stuffed[0].json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "permission_error",
            "not_answer_owner",
            "user",
        )
        # A user named on an answer generated without one is refused too.
        assert vote(http, attacker, anon["id"], rating="up", user="u1").status_code == 403

        # Another key's answer and comparison do not exist for the attacker.
        unknown = f"chatcmpl-{uuid.uuid4().hex}"
        unknown_body = vote(http, attacker, unknown, rating="up").json()
        for user in ("carol", None, "u1"):
            refused = vote(http, attacker, theirs["id"], rating="up", user=user)
            assert refused.status_code == 404
            assert refused.json() == same_but_id(unknown_body, unknown, theirs["id"])
        cmp_id, unknown_cmp = theirs_cmp.json()["id"], f"cmp-{uuid.uuid4().hex}"
        unknown_choice = http.post(
            f"/v1/comparisons/{unknown_cmp}/choice", headers=auth(attacker), json={"choice": "a"}
        )
        refused_choice = http.post(
            f"/v1/comparisons/{cmp_id}/choice", headers=auth(attacker), json={"choice": "a"}
        )
        assert unknown_choice.status_code == refused_choice.status_code == 404
        assert refused_choice.json() == same_but_id(unknown_choice.json(), unknown_cmp, cmp_id)

    # Nothing of the attack was stored: the honest votes alone.
    assert votes_on(database_url, mine["id"], anon["id"], theirs["id"]) == sorted(
        [
            {
                "completion_id": _uuid(mine["id"]),
                "key_id": attacker_id,
                "end_user": "alice",
                "rating": 1,
            },
            {
                "completion_id": _uuid(anon["id"]),
                "key_id": attacker_id,
                "end_user": "",
                "rating": -1,
            },
            {
                "completion_id": _uuid(theirs["id"]),
                "key_id": victim_id,
                "end_user": "carol",
                "rating": -1,
            },
        ],  # fmt: skip
        key=lambda v: (v["completion_id"], v["end_user"]),
    )
    assert query(database_url, "SELECT choice FROM comparisons WHERE id = %s", _uuid(cmp_id)) == [
        {"choice": None}
    ]

    # The snapshot's pairs for this prompt are what the honest votes give: alice's
    # answer over the two answers voted down.
    snapshot = build(database_url, PairSettings(min_answer_tokens=1), tmp_path / "snapshots")
    messages = [{"role": "user", "content": question}]
    pairs = query(
        database_url,
        "SELECT rule, chosen, rejected FROM pairs WHERE snapshot_id = %s AND prompt_sha256 = %s",
        snapshot.id,
        prompt_sha256(messages),
    )
    text = {r["id"]: r["choices"][0]["message"]["content"] for r in (mine, anon, theirs)}
    # Three texts the builder tells apart (it ignores case and runs of whitespace).
    assert len({" ".join(t.lower().split()) for t in text.values()}) == 3, text
    assert sorted((p["rule"], p["chosen"], p["rejected"]) for p in pairs) == sorted(
        [
            ("thumbs", text[mine["id"]], text[anon["id"]]),
            ("thumbs", text[mine["id"]], text[theirs["id"]]),
        ]
    )


def test_a_voter_over_the_day_cap_gets_429_and_nothing_is_stored(
    gateway: Gateway, database_url: str
) -> None:
    cap = Settings().votes_per_voter_per_day
    key_id, key = make_key(database_url, "chat", "capped", limits=FAST)
    answers = insert_answers(database_url, key_id, "dave", cap + 1)
    with httpx.Client(base_url=gateway.url, timeout=60) as http:

        def cast(answer: uuid.UUID) -> int:
            return vote(http, key, f"chatcmpl-{answer.hex}", rating="up", user="dave").status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(cast, answers[:cap]))
        assert statuses == [200] * cap
        over = vote(http, key, f"chatcmpl-{answers[cap].hex}", rating="up", user="dave")
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "vote_cap_exceeded"
        assert 0 < int(over.headers["Retry-After"]) <= 86400
        # Changing one's mind on an answer already voted on is not blocked.
        again = vote(http, key, f"chatcmpl-{answers[0].hex}", rating="down", user="dave")
        assert again.status_code == 200 and again.json()["updated"] is True
    stored = query(
        database_url, "SELECT count(*) AS n FROM votes WHERE key_id = %s", uuid.UUID(key_id)
    )
    assert stored == [{"n": cap}]
    assert votes_on(database_url, f"chatcmpl-{answers[cap].hex}") == []


def test_a_correction_over_the_cap_is_refused(
    gateway: Gateway, database_url: str, chat_key: tuple[str, str]
) -> None:
    cap = Settings().max_correction_chars
    (answer,) = insert_answers(database_url, chat_key[0], "erin", 1)
    completion_id = f"chatcmpl-{answer.hex}"
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        too_long = vote(http, chat_key[1], completion_id, rating="down", correction="x" * (cap + 1))
        assert too_long.status_code == 400
        error = too_long.json()["error"]
        assert (error["param"], error["code"]) == ("correction", "correction_too_long")
        assert votes_on(database_url, completion_id) == []
        at_cap = vote(http, chat_key[1], completion_id, rating="down", correction="x" * cap)
        assert at_cap.status_code == 200, at_cap.text
        assert at_cap.json()["user"] == "erin"  # no user named: the owner's vote


def same_but_id(body: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """An unknown id's error body, naming `new` instead: what another key's id gets."""
    error = body["error"]
    return {"error": {**error, "message": error["message"].replace(old, new)}}


def insert_answers(database_url: str, key_id: str, user: str, n: int) -> list[uuid.UUID]:
    """Logged answers of `key_id` for `user`, written straight to the table (votes on
    them go through the gateway)."""
    messages = [{"role": "user", "content": "Hi"}]
    ids = [uuid.uuid4() for _ in range(n)]
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO completions (id, key_id, end_user, public_model, engine_model,"
            " messages, params, prompt_sha256, stream, status, output)"
            " VALUES (%s, %s, %s, 'production', 'base', %s, '{}', %s, false, 'complete', 'Hi!')",
            [(i, key_id, user, Jsonb(messages), prompt_sha256(messages)) for i in ids],
        )
    return ids


def _uuid(public_id: str) -> str:
    return str(uuid.UUID(public_id.split("-", 1)[1]))
