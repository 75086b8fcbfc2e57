"""Request and response shapes of the public API, in OpenAI's JSON where one exists.

What reaches the engine is an allow-list. A chat request takes the OpenAI fields
declared below and a few of vLLM's sampling extras (`top_k`, `min_p`,
`repetition_penalty`); any other field, at the top or in a message, is refused with
400 `unsupported_parameter` naming it, so that no client reaches the engine's
internals (`chat_template_kwargs`, `vllm_xargs`, `kv_transfer_params`,
`structured_outputs`, `ignore_eos`, `priority`, ...). Ops may pass more fields
(`extra_request_fields`); `ChatCompletionRequest.check_fields` applies the list.

Every request body is clean input (`unclean`): no NUL, no lone surrogate, no NaN or
Infinity, anywhere. Python's JSON parser accepts all three, and Postgres, the
tokenizer or the sampler would fail on them after work was done.
"""

import math
import re
from collections.abc import Collection
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from serve.errors import InvalidRequest, is_json, unsupported_parameter

Role = Literal["system", "developer", "user", "assistant", "tool"]
INT64 = 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")


def unclean(value: Any) -> tuple[str, str] | None:
    """A value in a parsed JSON body that must not pass, as (its path, e.g.
    `messages.0.content`, why); None when the body is clean. Iterative: a deeply
    nested body must not exhaust the stack here."""
    pending: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            why = _bad_text(item)
        elif isinstance(item, float):
            why = None if math.isfinite(item) else "numbers must be finite (no NaN or Infinity)"
        elif isinstance(item, dict):
            why = next((w for k in item if (w := _bad_text(str(k)))), None)
            pending.extend((path + (k,), v) for k, v in item.items())
        elif isinstance(item, list):
            why = None
            pending.extend((path + (i,), v) for i, v in enumerate(item))
        else:
            why = None
        if why:
            return ".".join(str(p) for p in path), why
    return None


def _bad_text(text: str) -> str | None:
    # Postgres text and jsonb cannot hold NUL; a lone surrogate cannot be encoded as
    # UTF-8 at all (the database, the tokenizer and the log would each fail on it).
    if "\x00" in text:
        return "text must not contain NUL (\\u0000) characters"
    if _SURROGATE.search(text):
        return "text must be valid Unicode (no lone surrogates such as \\ud800)"
    return None


async def clean_body(request: Request) -> None:
    """An app-wide dependency: the JSON body (whichever model reads it) and the query
    and path parameters of every request pass `unclean`, before any route's work.
    FastAPI has parsed the body by now and `request.json()` returns what it cached."""
    params = [*request.path_params.items(), *request.query_params.multi_items()]
    for name, value in params:
        why = _bad_text(str(name)) or _bad_text(str(value))
        if why:
            raise InvalidRequest(f"{name}: {why}", param=str(name), code="invalid_value")
    route = request.scope.get("route")
    if getattr(route, "body_field", None) is None or not is_json(
        request.headers.get("content-type")
    ):
        return  # no JSON body is read on this route: FastAPI ignores or refuses it
    try:
        body = await request.json() if await request.body() else None
    except (ValueError, RecursionError):
        return  # not JSON after all: the route's own validation refuses it
    found = unclean(body)
    if found:
        path, why = found
        raise InvalidRequest(
            f"{path}: {why}" if path else why, param=path or None, code="invalid_value"
        )


# Validation context for a part of a request body that `clean_body` has walked (a
# batch's items): walking each again would double the work for nothing.
WALKED: dict[str, bool] = {"walked": True}


class CleanInput(BaseModel):
    """The base of every request body: refuses what `unclean` finds, so that a body
    built in code is held to the same rule as one the gateway parsed (which the
    `clean_body` dependency checks for every route, whatever its model)."""

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data: Any, info: ValidationInfo) -> Any:
        if info.context is WALKED:
            return data  # part of a body `clean_body` has walked already
        found = unclean(data)
        if found:
            path, why = found
            raise ValueError(f"{path}: {why}" if path else why)
        return data


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


# Fields of an assistant message as OpenAI's (and vLLM's) responses return them: a
# client that appends the answer it got to its next request sends them back, empty.
# Empty, they are dropped; with a value (tool calls, audio, ...) they are refused.
_ECHOED = frozenset(
    {"refusal", "annotations", "audio", "function_call", "tool_calls", "reasoning",
     "reasoning_content"}
)  # fmt: skip


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _drop_echoed(cls, data: Any) -> Any:
        if isinstance(data, dict) and _ECHOED & data.keys():
            return {k: v for k, v in data.items() if k not in _ECHOED or v not in (None, [])}
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = Field(
        default=None, description="Accepted for OpenAI clients; nothing is obfuscated."
    )


class ResponseFormat(BaseModel):
    """Plain text only: JSON modes are structured outputs, which the engine's grammar
    backend compiles from client input; they are not offered."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class Sampling(CleanInput):
    """Sampling knobs shared by chat requests and comparisons: OpenAI's, and vLLM's
    sampling extras (`top_k`, `min_p`, `repetition_penalty`), each within the bounds
    vLLM accepts, so that a bad value is our 400 rather than the engine's."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-INT64 - 1, le=INT64)
    top_k: int | None = Field(
        default=None, ge=-1, le=2**31 - 1, description="vLLM: the k likeliest tokens (0: all)."
    )
    min_p: float | None = Field(
        default=None, ge=0, le=1, description="vLLM: drop tokens below min_p x the top one's."
    )
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=2, description="vLLM: >1 discourages repeating tokens."
    )


# OpenAI's limits: four stop sequences, 20 top logprobs, 300 logit biases.
TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]
Bias = Annotated[float, Field(ge=-100, le=100)]


class ChatCompletionRequest(Sampling):
    # Unknown fields are kept (in model_extra) so that `check_fields` can name them,
    # and pass those that ops allowed; nothing unchecked reaches the engine.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: Literal[1] = Field(default=1, description="Only one choice per request is logged.")
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[TokenId, Bias] | None = Field(default=None, max_length=300)
    response_format: ResponseFormat | None = None
    user: str | None = Field(default=None, max_length=256)

    def check_fields(self, allowed: Collection[str]) -> None:
        """Refuse any field that is neither declared nor in `allowed` (the settings'
        `extra_request_fields`), naming it as OpenAI does."""
        for name in self.model_extra or {}:
            if name not in allowed:
                raise unsupported_parameter(name)


class FeedbackRequest(CleanInput):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=128)
    rating: Literal["up", "down"]
    comment: str | None = Field(default=None, max_length=10_000)
    correction: str | None = Field(
        default=None,
        max_length=100_000,
        description="A better answer; at most `max_correction_chars` (setting) characters.",
    )
    user: str | None = Field(
        default=None,
        max_length=256,
        description="The end user voting. Unset: the one the answer was generated for.",
    )
    feedback_token: str | None = Field(
        default=None,
        max_length=512,
        description="The answer's `feedback_token`, instead of an API key (from a browser).",
    )


class FeedbackResponse(BaseModel):
    object: Literal["feedback"] = "feedback"
    completion_id: str
    rating: Literal["up", "down"]
    user: str | None = Field(description="The end user the vote counts for (null: none).")
    comment: str | None
    correction: str | None
    updated: bool = Field(description="True when this replaced an earlier vote by the same user.")


class ComparisonRequest(Sampling):
    """A chat request answered twice, by production and candidate (or two samples)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    user: str | None = Field(default=None, max_length=256)


class ComparisonAnswer(BaseModel):
    message: dict[str, Any]
    finish_reason: str | None


class ComparisonResponse(BaseModel):
    id: str
    object: Literal["comparison"] = "comparison"
    a: ComparisonAnswer
    b: ComparisonAnswer
    feedback_token: str | None = Field(
        default=None,
        description="Lets the end user's browser post the choice without the API key.",
    )


class ChoiceRequest(CleanInput):
    model_config = ConfigDict(extra="forbid")

    choice: Literal["a", "b", "tie", "both_bad"]
    user: str | None = Field(
        default=None,
        max_length=256,
        description="The end user choosing. Unset: the one the comparison was made for.",
    )
    feedback_token: str | None = Field(
        default=None,
        max_length=512,
        description="The comparison's `feedback_token`, instead of an API key.",
    )


class ChoiceResponse(BaseModel):
    id: str
    object: Literal["comparison.choice"] = "comparison.choice"
    choice: Literal["a", "b", "tie", "both_bad"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ratchet"
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterRegisterRequest(CleanInput):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="Directory of a PEFT LoRA adapter.")
