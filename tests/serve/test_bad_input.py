"""Every bad input gets a clear 4xx in OpenAI's error body, and writes nothing."""

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ratchet.settings import Settings
from serve.app import create_app
from tests.helpers import auth, counts, free_port

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return dict(body["error"])


@pytest.mark.usefixtures("unchanged")
class TestChatRequests:
    def test_malformed_json(self, app_client: TestClient, chat_key: tuple[str, str]) -> None:
        response = app_client.post(
            CHAT,
            content=b'{"model": "base", "messages": [',
            headers={**auth(chat_key[1]), "content-type": "application/json"},
        )
        error = error_of(response, 400)
        assert error["code"] == "invalid_json" and "JSON" in error["message"]

    def test_empty_messages(self, app_client: TestClient, chat_key: tuple[str, str]) -> None:
        response = app_client.post(
            CHAT, json={"model": "base", "messages": []}, headers=auth(chat_key[1])
        )
        assert error_of(response, 400)["param"] == "messages"

    def test_unknown_role(self, app_client: TestClient, chat_key: tuple[str, str]) -> None:
        response = app_client.post(
            CHAT,
            json={"model": "base", "messages": [{"role": "wizard", "content": "hi"}]},
            headers=auth(chat_key[1]),
        )
        assert error_of(response, 400)["param"] == "messages.0.role"

    def test_nul_characters(self, app_client: TestClient, chat_key: tuple[str, str]) -> None:
        for messages in (
            [{"role": "user", "content": "a\u0000b"}],
            [{"role": "user", "content": "hi", "name": "\u0000"}],
        ):
            response = app_client.post(
                CHAT, json={"model": "base", "messages": messages}, headers=auth(chat_key[1])
            )
            assert "NUL" in error_of(response, 400)["message"]
        vote = app_client.post(
            "/v1/feedback",
            headers=auth(chat_key[1]),
            json={"completion_id": "chatcmpl-0", "rating": "up", "comment": "\u0000"},
        )
        error_of(vote, 400)

    def test_unknown_model(self, app_client: TestClient, chat_key: tuple[str, str]) -> None:
        response = app_client.post(
            CHAT, json={"model": "gpt-5", "messages": HELLO}, headers=auth(chat_key[1])
        )
        error = error_of(response, 404)
        assert (error["param"], error["code"]) == ("model", "model_not_found")

    @pytest.mark.usefixtures("no_candidate")
    def test_candidate_when_none_exists(
        self, app_client: TestClient, chat_key: tuple[str, str]
    ) -> None:
        response = app_client.post(
            CHAT, json={"model": "candidate", "messages": HELLO}, headers=auth(chat_key[1])
        )
        assert error_of(response, 404)["code"] == "model_not_found"

    @pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
    def test_max_tokens_over_cap(
        self, app_client: TestClient, chat_key: tuple[str, str], field: str
    ) -> None:
        response = app_client.post(
            CHAT, json={"model": "base", "messages": HELLO, field: 65}, headers=auth(chat_key[1])
        )
        error = error_of(response, 400)
        assert error["param"] == field and "64" in error["message"]

    def test_body_over_limit(self, app_client: TestClient, chat_key: tuple[str, str]) -> None:
        big = [{"role": "user", "content": "x" * 5000}]
        response = app_client.post(
            CHAT, json={"model": "base", "messages": big}, headers=auth(chat_key[1])
        )
        assert error_of(response, 413)["code"] == "body_too_large"

    def test_chunked_body_over_limit(
        self, app_client: TestClient, chat_key: tuple[str, str]
    ) -> None:
        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted
            yield b'{"model": "base", "messages": [{"role": "user", "content": "'
            yield b"x" * 5000
            yield b'"}]}'

        response = app_client.post(
            CHAT,
            content=chunks(),
            headers={**auth(chat_key[1]), "content-type": "application/json"},
        )
        error_of(response, 413)


@pytest.mark.usefixtures("unchanged")
class TestFeedbackRequests:
    def test_vote_for_unknown_completion(
        self, app_client: TestClient, chat_key: tuple[str, str]
    ) -> None:
        for completion_id in ("chatcmpl-" + "0" * 32, "not-an-id"):
            response = app_client.post(
                "/v1/feedback",
                headers=auth(chat_key[1]),
                json={"completion_id": completion_id, "rating": "up"},
            )
            error = error_of(response, 404)
            assert (error["param"], error["code"]) == ("completion_id", "completion_not_found")

    def test_bad_rating(self, app_client: TestClient, chat_key: tuple[str, str]) -> None:
        response = app_client.post(
            "/v1/feedback",
            headers=auth(chat_key[1]),
            json={"completion_id": "chatcmpl-x", "rating": "meh"},
        )
        assert error_of(response, 400)["param"] == "rating"

    def test_choice_on_unknown_comparison(
        self, app_client: TestClient, chat_key: tuple[str, str]
    ) -> None:
        for comparison in ("cmp-" + "0" * 32, "nope"):
            response = app_client.post(
                f"/v1/comparisons/{comparison}/choice",
                headers=auth(chat_key[1]),
                json={"choice": "a"},
            )
            assert error_of(response, 404)["code"] == "comparison_not_found"

    def test_bad_choice(self, app_client: TestClient, chat_key: tuple[str, str]) -> None:
        response = app_client.post(
            "/v1/comparisons/cmp-x/choice", headers=auth(chat_key[1]), json={"choice": "c"}
        )
        assert error_of(response, 400)["param"] == "choice"

    def test_comparison_with_no_messages(
        self, app_client: TestClient, chat_key: tuple[str, str]
    ) -> None:
        response = app_client.post(
            "/v1/comparisons", headers=auth(chat_key[1]), json={"messages": []}
        )
        assert error_of(response, 400)["param"] == "messages"


def test_decided_comparison_refuses_a_different_choice(
    app_client: TestClient, chat_key: tuple[str, str], database_url: str
) -> None:
    created = app_client.post(
        "/v1/comparisons", headers=auth(chat_key[1]), json={"messages": HELLO, "max_tokens": 8}
    )
    assert created.status_code == 200, created.text
    url = f"/v1/comparisons/{created.json()['id']}/choice"
    assert (
        app_client.post(url, headers=auth(chat_key[1]), json={"choice": "tie"}).status_code == 200
    )
    before = counts(database_url)
    error = error_of(app_client.post(url, headers=auth(chat_key[1]), json={"choice": "a"}), 409)
    assert error["code"] == "already_decided" and "tie" in error["message"]
    assert counts(database_url) == before
    row = app_client.post(url, headers=auth(chat_key[1]), json={"choice": "tie"})
    assert row.json()["choice"] == "tie"


def test_engine_down_gives_503_with_retry_after(
    settings: Settings, chat_key: tuple[str, str], database_url: str
) -> None:
    assert settings.database_url
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    before = counts(database_url)
    with TestClient(create_app(settings, settings.database_url, engine_url=dead)) as client:
        for body in (
            {"model": "base", "messages": HELLO},
            {"model": "base", "messages": HELLO, "stream": True},
        ):
            response = client.post(CHAT, json=body, headers=auth(chat_key[1]))
            assert error_of(response, 503)["code"] == "engine_unavailable"
            assert response.headers["retry-after"].isdigit()
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {
            "database": True,
            "storage": True,
            "engine": False,
            "adapters": False,
            "serving": True,
        }
    assert counts(database_url) == before
