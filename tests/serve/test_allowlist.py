"""What reaches the engine is an allow-list; every body is clean input; every error,
even an unexpected one, is an OpenAI error body that names no engine replica."""

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import Receive, Scope, Send

from ratchet.engine import EngineRejected, EngineTimeout, EngineUnavailable
from ratchet.settings import Settings
from serve import errors
from serve.app import create_app
from serve.errors import InvalidRequest, from_engine
from serve.protocol import ChatCompletionRequest
from tests.helpers import Gateway, auth, counts, fresh_database, make_key, query

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]

# vLLM's own request fields that reach templates, kv transfer, structured outputs,
# priorities, logits processors, ... plus the OpenAI fields the gateway does not serve.
REFUSED: dict[str, Any] = {
    "chat_template": "{{ 'owned' }}",
    "chat_template_kwargs": {"enable_thinking": True},
    "vllm_xargs": {"a": 1},
    "kv_transfer_params": {"do_remote_prefill": True},
    "structured_outputs": {"regex": "a+"},
    "guided_json": {"type": "object"},
    "guided_regex": "a+",
    "guided_choice": ["a", "b"],
    "ignore_eos": True,
    "min_tokens": 200,
    "priority": -100,
    "logits_processors": ["os.system"],
    "prompt_logprobs": 5,
    "echo": True,
    "add_generation_prompt": False,
    "continue_final_message": True,
    "documents": [{"title": "t", "text": "x"}],
    "mm_processor_kwargs": {"a": 1},
    "request_id": "mine",
    "cache_salt": "salt",
    "allowed_token_ids": [1, 2],
    "bad_words": ["cat"],
    "return_token_ids": True,
    "truncate_prompt_tokens": 4,
    "skip_special_tokens": False,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "none",
    "parallel_tool_calls": False,
    "functions": [{"name": "f"}],
    "store": True,
    "metadata": {"a": "b"},
    "service_tier": "auto",
}


def error_of(response: Any, status: int) -> dict[str, Any]:
    """The OpenAI error body, after checking its exact shape (of an httpx or a
    TestClient response)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return dict(body["error"])


def post(gateway: Gateway, secret: str, body: Any, path: str = CHAT) -> httpx.Response:
    return httpx.post(gateway.url + path, json=body, headers=auth(secret), timeout=60)


def post_raw(
    gateway: Gateway, secret: str, text: str | bytes, path: str = CHAT, media: str = "json"
) -> httpx.Response:
    headers = {**auth(secret), "content-type": f"application/{media}"}
    return httpx.post(gateway.url + path, content=text, headers=headers, timeout=60)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("field", sorted(REFUSED))
def test_refused_field_is_named(gateway: Gateway, chat_key: tuple[str, str], field: str) -> None:
    body = {"model": "base", "messages": HELLO, "max_tokens": 4, field: REFUSED[field]}
    error = error_of(post(gateway, chat_key[1], body), 400)
    assert (error["param"], error["code"], error["type"]) == (
        field,
        "unsupported_parameter",
        "invalid_request_error",
    )
    assert field in error["message"]


@pytest.mark.usefixtures("unchanged")
def test_refused_field_in_a_stream_and_a_comparison(
    gateway: Gateway, chat_key: tuple[str, str]
) -> None:
    body = {"model": "base", "messages": HELLO, "stream": True, "ignore_eos": True}
    assert error_of(post(gateway, chat_key[1], body), 400)["param"] == "ignore_eos"
    compare = {"messages": HELLO, "priority": -1}
    error = error_of(post(gateway, chat_key[1], compare, "/v1/comparisons"), 400)
    assert (error["param"], error["code"]) == ("priority", "unsupported_parameter")


MESSAGE_EXTRAS = [
    ([{"role": "user", "content": "hi", "chat_template_kwargs": {}}],
     "messages.0.chat_template_kwargs"),
    ([{"role": "user", "content": "hi", "tool_call_id": "c1"}], "messages.0.tool_call_id"),
    (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ]},
        ],
        "messages.1.tool_calls",
    ),
    (
        [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}],
        "messages.0.content.0.cache_control",
    ),
]  # fmt: skip


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(("messages", "param"), MESSAGE_EXTRAS)
def test_message_extras_are_refused(
    gateway: Gateway, chat_key: tuple[str, str], messages: list[Any], param: str
) -> None:
    body = {"model": "base", "messages": messages, "max_tokens": 4}
    error = error_of(post(gateway, chat_key[1], body), 400)
    assert (error["param"], error["code"]) == (param, "unsupported_parameter")


@pytest.mark.usefixtures("unchanged")
def test_nested_extras_are_refused(gateway: Gateway, chat_key: tuple[str, str]) -> None:
    for extra, param in (
        ({"stream": True, "stream_options": {"continuous_usage_stats": True}},
         "stream_options.continuous_usage_stats"),
        ({"response_format": {"type": "text", "schema": {}}}, "response_format.schema"),
    ):  # fmt: skip
        body = {"model": "base", "messages": HELLO, **extra}
        error = error_of(post(gateway, chat_key[1], body), 400)
        assert (error["param"], error["code"]) == (param, "unsupported_parameter")
    # Structured outputs by another name: JSON modes are not offered.
    body = {"model": "base", "messages": HELLO, "response_format": {"type": "json_object"}}
    assert error_of(post(gateway, chat_key[1], body), 400)["param"] == "response_format.type"


def test_allowed_extras_answer_and_are_logged(
    gateway: Gateway, chat_key: tuple[str, str], database_url: str
) -> None:
    sampling = {
        "top_k": 5,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "seed": 7,
        "temperature": 0.7,
        "logprobs": True,
        "top_logprobs": 2,
        "logit_bias": {"2": -100},
        "response_format": {"type": "text"},
    }
    body = {"model": "base", "messages": HELLO, "max_tokens": 6, **sampling}
    response = post(gateway, chat_key[1], body)
    assert response.status_code == 200, response.text
    answer = response.json()
    tokens = answer["choices"][0]["logprobs"]["content"]
    assert tokens and all(len(t["top_logprobs"]) == 2 for t in tokens)  # they reached vLLM
    uid = answer["id"].removeprefix("chatcmpl-")
    row = query(database_url, "SELECT params FROM completions WHERE id = %s", uid)[0]
    assert row["params"] == {**sampling, "max_tokens": 6}


def test_an_answer_sent_back_by_the_openai_client_passes(
    gateway: Gateway, chat_key: tuple[str, str], database_url: str
) -> None:
    # The client re-sends the answer's message with refusal/annotations/audio/... set to
    # null: an honest multi-turn conversation must not be refused for it.
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=chat_key[1])
    first = client.chat.completions.create(model="base", messages=HELLO, max_tokens=4)  # type: ignore[arg-type]
    said = first.choices[0].message
    second = client.chat.completions.create(
        model="base",
        messages=[*HELLO, said, {"role": "user", "content": "And then?"}],  # type: ignore[list-item]
        max_tokens=4,
    )
    uid = second.id.removeprefix("chatcmpl-")
    row = query(database_url, "SELECT messages FROM completions WHERE id = %s", uid)[0]
    assert row["messages"][1] == {"role": "assistant", "content": said.content}


# Python's JSON parser takes NaN, Infinity and lone surrogates: each must be a 400.
UNCLEAN = [
    ("chat", CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], '
     '"temperature": NaN}', "temperature"),
    ("chat", CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], '
     '"vllm_xargs": {"a": -Infinity}}', "vllm_xargs.a"),
    ("chat", CHAT, '{"model": "base", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages.0.content"),
    ("chat", CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], '
     '"user": "\\udfff"}', "user"),
    ("chat", CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], '
     '"metadata": {"\\ud800": 1}}', "metadata"),
    ("chat", "/v1/feedback", '{"completion_id": "chatcmpl-x", "rating": "up", '
     '"comment": "\\ud800"}', "comment"),
    ("chat", "/v1/feedback", '{"completion_id": "chatcmpl-x", "rating": Infinity}', "rating"),
    ("chat", "/v1/comparisons", '{"messages": [{"role": "user", "content": "hi"}], '
     '"temperature": Infinity}', "temperature"),
    ("chat", "/v1/comparisons", '{"messages": [{"role": "user", "content": "\\udc00"}]}',
     "messages.0.content"),
    ("chat", "/v1/comparisons/cmp-x/choice", '{"choice": "a", "user": "\\ud800"}', "user"),
    ("ops", "/v1/admin/adapters", '{"path": "/tmp/\\ud800"}', "path"),
    ("ops", "/v1/admin/evaluations", '{"adapter": "x", "threshold": NaN}', "threshold"),
]  # fmt: skip


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(("role", "path", "text", "param"), UNCLEAN)
def test_non_finite_numbers_and_bad_unicode_are_refused(
    gateway: Gateway,
    chat_key: tuple[str, str],
    ops_key: tuple[str, str],
    role: str,
    path: str,
    text: str,
    param: str,
) -> None:
    secret = (chat_key if role == "chat" else ops_key)[1]
    error = error_of(post_raw(gateway, secret, text, path), 400)
    assert (error["param"], error["code"]) == (param, "invalid_value")


@pytest.mark.usefixtures("unchanged")
def test_bad_query_parameters_are_refused(gateway: Gateway, ops_key: tuple[str, str]) -> None:
    for url in ("/v1/admin/evaluations?adapter=%00", "/v1/admin/promotions?x=%00y"):
        response = httpx.get(gateway.url + url, headers=auth(ops_key[1]), timeout=30)
        assert error_of(response, 400)["code"] == "invalid_value"


def test_widened_list_passes_a_field(chat_key: tuple[str, str]) -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "base", "messages": HELLO, "ignore_eos": True, "top_k": 3}
    )
    with pytest.raises(InvalidRequest) as refused:
        request.check_fields(Settings().extra_request_fields)
    assert (refused.value.param, refused.value.code) == ("ignore_eos", "unsupported_parameter")
    request.check_fields(Settings(extra_request_fields=["ignore_eos"]).extra_request_fields)
    with pytest.raises(InvalidRequest, match="vllm_xargs"):
        ChatCompletionRequest.model_validate(
            {"model": "base", "messages": HELLO, "ignore_eos": True, "vllm_xargs": {}}
        ).check_fields(["ignore_eos"])


def test_a_widened_field_reaches_the_engine(
    settings: Settings, gateway: Gateway, chat_key: tuple[str, str], database_url: str
) -> None:
    # In-process, on the shared engine: ignore_eos makes the answer run to max_tokens.
    widened = settings.model_copy(update={"extra_request_fields": ["ignore_eos"]})
    app = create_app(widened, database_url, engine_url=gateway.engine_url)
    body = {"model": "base", "messages": HELLO, "max_tokens": 24, "ignore_eos": True}
    with TestClient(app) as client:
        response = client.post(CHAT, json=body, headers=auth(chat_key[1]))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["usage"]["completion_tokens"] == 24
    uid = answer["id"].removeprefix("chatcmpl-")
    row = query(database_url, "SELECT params FROM completions WHERE id = %s", uid)[0]
    assert row["params"] == {"ignore_eos": True, "max_tokens": 24}


@pytest.mark.usefixtures("unchanged")
class TestEveryErrorIsAnOpenAIBody:
    def test_unknown_route(self, gateway: Gateway) -> None:
        error = error_of(httpx.post(gateway.url + "/v1/nope", json={}, timeout=30), 404)
        assert error["code"] == "not_found" and "/v1/nope" in error["message"]

    def test_method_not_allowed(self, gateway: Gateway) -> None:
        for method, path in (("GET", CHAT), ("DELETE", "/v1/models"), ("PUT", "/v1/feedback")):
            response = httpx.request(method, gateway.url + path, timeout=30)
            error = error_of(response, 405)
            assert error["code"] == "method_not_allowed" and response.headers["allow"]

    def test_head_request(self, gateway: Gateway) -> None:
        response = httpx.head(gateway.url + "/v1/models", timeout=30)
        # No body may come with a HEAD answer; what would come is the error body.
        assert response.status_code == 405 and response.content == b""
        assert response.headers["content-type"] == "application/json"
        assert response.headers["allow"] == "GET"

    @pytest.mark.parametrize("text", ["[1, 2]", '"hello"', "3", "null", "[" * 50_000])
    def test_json_that_is_not_an_object(
        self, gateway: Gateway, chat_key: tuple[str, str], text: str
    ) -> None:
        error_of(post_raw(gateway, chat_key[1], text), 400)

    @pytest.mark.parametrize(
        "media", ["text/plain", "application/x-www-form-urlencoded", "application/octet-stream"]
    )
    def test_odd_content_types(
        self, gateway: Gateway, chat_key: tuple[str, str], media: str
    ) -> None:
        body = json.dumps({"model": "base", "messages": HELLO})
        headers = {**auth(chat_key[1]), "content-type": media}
        response = httpx.post(gateway.url + CHAT, content=body, headers=headers, timeout=30)
        assert error_of(response, 415)["code"] == "unsupported_media_type"

    def test_bodies_that_are_not_json(self, gateway: Gateway, chat_key: tuple[str, str]) -> None:
        for raw in (b'{"model": "base", "messages": "\xff\xfe"}', b"", b"{"):
            error_of(post_raw(gateway, chat_key[1], raw), 400)

    def test_an_exception_in_a_middleware_or_route(self) -> None:
        app = FastAPI()
        errors.install(app)

        @app.get("/boom")
        async def boom() -> None:
            raise RuntimeError("a bug")

        class Failing:
            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
                if scope["type"] == "http" and scope["path"] == "/mw":
                    raise RuntimeError("a middleware bug")
                await self.app(scope, receive, send)

        app.add_middleware(Failing)
        with TestClient(app, raise_server_exceptions=False) as client:
            for path in ("/boom", "/mw"):
                error = error_of(client.get(path), 500)
                assert error["type"] == "server_error" and "bug" not in error["message"]


class StubEngine(BaseHTTPRequestHandler):
    """A stand-in vLLM server whose answers name its own URL and disk, and whose stream
    breaks off in malformed JSON: what a client sees of either must be clean."""

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {})
        else:  # /v1/models
            self._json(200, {"object": "list", "data": [{"id": "/srv/models/stub"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        url = f"http://{self.headers['host']}"
        if body.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            # vLLM names the answer after the X-Request-Id the gateway sends.
            chunk = {
                "id": f"chatcmpl-{self.headers['x-request-id']}",
                "choices": [{"index": 0, "delta": {"content": "Hi"}}],
            }
            self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: {{broken\n\n".encode())
            return
        status = 500 if body.get("temperature") == 1.5 else 400
        message = (
            f"model {body['model']} at /srv/models/stub is not on {url}/v1 "
            f"(peer 10.1.2.3:8000, http://internal.example:9/x)"
        )
        self._json(status, {"error": {"message": message, "type": "BadRequestError",
                                      "param": None, "code": status}})  # fmt: skip

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def stub_engine() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubEngine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def stub_world(server_url: str, settings: Settings) -> Iterator[tuple[Settings, str, str]]:
    """A database of its own for the stand-in engine: production there is the base, so
    the gateway asks the stub for no adapter (the session's may promote one)."""
    with fresh_database(server_url, "ratchet_stub") as url:
        _, secret = make_key(url, "chat", "stub")
        yield settings.model_copy(update={"database_url": url}), url, secret


def assert_names_no_engine(text: str, engine_url: str) -> None:
    port = engine_url.rsplit(":", 1)[1]
    for leak in (engine_url, port, "127.0.0.1", "10.1.2.3", "internal.example", "/srv/"):
        assert leak not in text, (leak, text)


def test_engine_errors_name_no_replica(
    stub_world: tuple[Settings, str, str], stub_engine: str
) -> None:
    settings, database_url, secret = stub_world
    before = counts(database_url)
    app = create_app(settings, database_url, engine_url=stub_engine)
    with TestClient(app) as client:
        refused = client.post(CHAT, json={"model": "base", "messages": HELLO}, headers=auth(secret))
        error = error_of(refused, 400)
        assert "is not on" in error["message"]  # the rest of vLLM's message is kept
        assert_names_no_engine(refused.text, stub_engine)
        failed = client.post(
            CHAT,
            json={"model": "base", "messages": HELLO, "temperature": 1.5},
            headers=auth(secret),
        )
        assert error_of(failed, 500)["type"] == "server_error"
        assert_names_no_engine(failed.text, stub_engine)
    assert counts(database_url) == before


def test_a_stream_that_breaks_ends_in_an_error_event(
    stub_world: tuple[Settings, str, str], stub_engine: str
) -> None:
    settings, database_url, secret = stub_world
    app = create_app(settings, database_url, engine_url=stub_engine)
    body = {"model": "base", "messages": HELLO, "stream": True}
    with TestClient(app) as client:
        response = client.post(CHAT, json=body, headers=auth(secret))
    assert response.status_code == 200
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    last = json.loads(events[-1])
    assert last["error"]["code"] == "stream_failed" and "[DONE]" not in events
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert_names_no_engine(response.text, stub_engine)
    uid = json.loads(events[0])["id"].removeprefix("chatcmpl-")
    rows = query(database_url, "SELECT status, output FROM completions WHERE id = %s", uid)
    assert rows == [{"status": "aborted", "output": "Hi"}]


def test_from_engine_hides_replica_urls() -> None:
    url = "http://vllm-0.vllm.svc:8000"
    for exc in (
        EngineUnavailable(f"engine {url} unreachable: ConnectError()", url),
        EngineTimeout(f"engine {url} did not answer in time", url),
        EngineRejected(400, {"error": {"message": f"bad: {url}/v1, vllm-0.vllm.svc:8000"}}, url),
        EngineRejected(500, {"error": {"message": f"Traceback ... {url} /opt/vllm/x.py"}}, url),
        EngineRejected(404, {"detail": f"The model `/models/base` does not exist at {url}."}, url),
    ):  # fmt: skip
        shown = from_engine(exc)
        assert "vllm-0" not in shown.message and "/models" not in shown.message, shown.message
        assert "/opt" not in shown.message and "8000" not in shown.message
