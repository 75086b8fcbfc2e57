"""End to end: `ratchet serve` + real vLLM + real Postgres, driven by the official client."""

import json
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from feedback.prompts import prompt_sha256
from ratchet.model import MANIFEST
from tests.helpers import Gateway, auth, counts, query, wait_until_ended

QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


@pytest.fixture(scope="module")
def client(gateway: Gateway, chat_key: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=chat_key[1])


@pytest.fixture(scope="module")
def base_sha(base_model_dir: Path) -> str:
    return str(json.loads((base_model_dir / MANIFEST).read_text())["weights_sha256"])


def test_non_streaming_answer_is_logged_with_provenance(
    client: openai.OpenAI, database_url: str, chat_key: tuple[str, str], base_sha: str
) -> None:
    reply = client.chat.completions.create(
        model="production", messages=QUESTION, temperature=0, max_tokens=24, user="alice"
    )
    assert reply.model == "production"
    assert "Paris" in (reply.choices[0].message.content or "")
    row = query(
        database_url, "SELECT * FROM completions WHERE id = %s", reply.id.removeprefix("chatcmpl-")
    )[0]
    assert row["status"] == "complete" and row["stream"] is False
    assert row["output"] == reply.choices[0].message.content
    assert row["finish_reason"] == reply.choices[0].finish_reason
    assert row["messages"] == QUESTION
    assert row["params"] == {"temperature": 0.0, "max_tokens": 24}
    assert row["prompt_sha256"] == prompt_sha256([dict(m) for m in QUESTION])
    assert row["public_model"] == "production"
    assert row["adapter_id"] is None and row["adapter_sha256"] is None  # nothing promoted
    assert row["base_model_sha256"] == base_sha
    assert reply.usage is not None
    assert row["prompt_tokens"] == reply.usage.prompt_tokens
    assert row["completion_tokens"] == reply.usage.completion_tokens
    assert row["latency_ms"] > 0
    assert str(row["key_id"]) == chat_key[0]
    assert row["end_user"] == "alice"


def test_streaming_answer_is_logged_before_done(
    client: openai.OpenAI, database_url: str, base_sha: str
) -> None:
    stream = client.chat.completions.create(
        model="base", messages=QUESTION, temperature=0, max_tokens=24, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and "Paris" in text
    assert all(c.model == "base" for c in chunks)
    assert all(c.usage is None for c in chunks)  # usage was not asked for
    row = query(
        database_url, "SELECT * FROM completions WHERE id = %s", ids.pop().removeprefix("chatcmpl-")
    )[0]
    assert row["stream"] is True and row["status"] == "complete"
    assert row["output"] == text
    assert row["finish_reason"] == "stop"
    assert row["completion_tokens"] and row["prompt_tokens"]
    assert row["base_model_sha256"] == base_sha and row["public_model"] == "base"


def test_streaming_usage_when_asked(client: openai.OpenAI, database_url: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model="base",
            messages=QUESTION,
            temperature=0,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 4
    row = query(
        database_url,
        "SELECT completion_tokens, finish_reason FROM completions WHERE id = %s",
        chunks[0].id.removeprefix("chatcmpl-"),
    )[0]
    assert row == {"completion_tokens": 4, "finish_reason": "length"}


@pytest.mark.usefixtures("no_candidate")
def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["base", "production"]


def test_thumbs_vote_is_stored_and_replaced(
    client: openai.OpenAI, gateway: Gateway, chat_key: tuple[str, str], database_url: str
) -> None:
    reply = client.chat.completions.create(
        model="base", messages=QUESTION, max_tokens=16, user="bob"
    )  # bob's answer: bob votes on it
    body = {
        "completion_id": reply.id,
        "rating": "down",
        "comment": "too short",
        "correction": "Paris is the capital of France.",
        "user": "bob",
    }
    first = httpx.post(gateway.url + "/v1/feedback", json=body, headers=auth(chat_key[1]))
    assert first.status_code == 200, first.text
    assert first.json()["updated"] is False
    again = httpx.post(
        gateway.url + "/v1/feedback",
        headers=auth(chat_key[1]),
        json={**body, "rating": "up", "comment": None, "correction": None},
    )
    assert again.status_code == 200 and again.json()["updated"] is True
    rows = query(
        database_url,
        "SELECT * FROM votes WHERE completion_id = %s",
        reply.id.removeprefix("chatcmpl-"),
    )
    assert len(rows) == 1
    vote = rows[0]
    assert (vote["rating"], vote["end_user"], vote["comment"], vote["correction"]) == (
        1,
        "bob",
        None,
        None,
    )
    assert str(vote["key_id"]) == chat_key[0]
    assert vote["updated_at"] > vote["created_at"]


@pytest.mark.usefixtures("no_candidate")
def test_pairwise_choice_is_stored_blind(
    gateway: Gateway, chat_key: tuple[str, str], database_url: str
) -> None:
    created = httpx.post(
        gateway.url + "/v1/comparisons",
        headers=auth(chat_key[1]),
        timeout=120,
        json={"messages": QUESTION, "max_tokens": 16, "temperature": 1.0, "user": "carol"},
    )
    assert created.status_code == 200, created.text
    body = created.json()
    assert set(body) == {"id", "object", "a", "b", "feedback_token"}
    assert "model" not in json.dumps(body)  # which model answered stays hidden
    choice = httpx.post(
        f"{gateway.url}/v1/comparisons/{body['id']}/choice",
        headers=auth(chat_key[1]),
        json={"choice": "b", "user": "carol"},
    )
    assert choice.status_code == 200 and choice.json()["choice"] == "b"
    same = httpx.post(
        f"{gateway.url}/v1/comparisons/{body['id']}/choice",
        headers=auth(chat_key[1]),
        json={"choice": "b", "user": "carol"},
    )
    assert same.status_code == 200  # repeating the same decision is harmless
    row = query(
        database_url, "SELECT * FROM comparisons WHERE id = %s", body["id"].removeprefix("cmp-")
    )[0]
    assert (row["choice"], row["chooser"], row["end_user"]) == ("b", "carol", "carol")
    assert row["decided_at"] is not None and row["messages"] == QUESTION
    answers = query(
        database_url,
        "SELECT id, public_model, output FROM completions WHERE id IN (%s, %s)",
        row["completion_a"],
        row["completion_b"],
    )
    by_id = {a["id"]: a for a in answers}
    assert by_id[row["completion_a"]]["output"] == body["a"]["message"]["content"]
    assert by_id[row["completion_b"]]["output"] == body["b"]["message"]["content"]
    # No candidate exists in this module, so both answers are production samples.
    assert {a["public_model"] for a in answers} == {"production"}


def test_metrics_count_requests_tokens_and_votes(gateway: Gateway) -> None:
    text = httpx.get(gateway.url + "/metrics").text
    assert 'ratchet_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'ratchet_tokens_total{kind="completion",model="base"}' in text
    assert 'ratchet_votes_total{rating="up"}' in text
    assert "ratchet_completion_latency_seconds_bucket" in text


def test_prompt_over_engine_context_is_a_clean_400(
    client: openai.OpenAI, database_url: str
) -> None:
    before = counts(database_url)
    long: list[ChatCompletionMessageParam] = [{"role": "user", "content": "cat " * 3000}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=long, max_tokens=8)
    assert "context" in str(caught.value).lower() or "length" in str(caught.value).lower()
    assert counts(database_url) == before


def test_client_leaving_mid_stream_leaves_an_aborted_row(
    gateway: Gateway, chat_key: tuple[str, str], database_url: str, base_model_dir: Path
) -> None:
    # The answer must not end on its own: the end-of-sequence token is banned with
    # OpenAI's logit_bias (vLLM's ignore_eos is not for clients).
    eos = json.loads((base_model_dir / "config.json").read_text())["eos_token_id"]
    body = {
        "model": "base",
        "messages": QUESTION,
        "max_tokens": 200,
        "stream": True,
        "logit_bias": {str(eos): -100},
    }
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json=body,
        headers=auth(chat_key[1]),
        timeout=60,
    ) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
    uid = first["id"].removeprefix("chatcmpl-")
    row = wait_until_ended(database_url, uid)
    assert row["status"] == "aborted"
    assert (row["completion_tokens"] or 0) < 200
    assert row["latency_ms"] is not None
