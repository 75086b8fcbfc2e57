"""Request and response shapes of the public API, in OpenAI's JSON where one exists.

Chat requests accept unknown fields (vLLM's extra sampling parameters such as
`top_k` or `ignore_eos`) and pass them to the engine unchanged.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["system", "developer", "user", "assistant", "tool"]


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class NoNul(BaseModel):
    """Refuses NUL characters anywhere in the body: Postgres text and jsonb cannot hold
    them, and finding out only at logging time would waste the engine's work."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if _has_nul(data):
            raise ValueError("text must not contain NUL (\\u0000) characters")
        return data


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(NoNul):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: Literal[1] = Field(default=1, description="Only one choice per request is logged.")
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = Field(default=None, max_length=256)


class FeedbackRequest(NoNul):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=128)
    rating: Literal["up", "down"]
    comment: str | None = Field(default=None, max_length=10_000)
    correction: str | None = Field(default=None, max_length=100_000)
    user: str | None = Field(default=None, max_length=256)


class FeedbackResponse(BaseModel):
    object: Literal["feedback"] = "feedback"
    completion_id: str
    rating: Literal["up", "down"]
    user: str | None
    comment: str | None
    correction: str | None
    updated: bool = Field(description="True when this replaced an earlier vote by the same user.")


class ComparisonRequest(NoNul):
    """A chat request answered twice, by production and candidate (or two samples)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    user: str | None = Field(default=None, max_length=256)


class ComparisonAnswer(BaseModel):
    message: dict[str, Any]
    finish_reason: str | None


class ComparisonResponse(BaseModel):
    id: str
    object: Literal["comparison"] = "comparison"
    a: ComparisonAnswer
    b: ComparisonAnswer


class ChoiceRequest(NoNul):
    model_config = ConfigDict(extra="forbid")

    choice: Literal["a", "b", "tie", "both_bad"]
    user: str | None = Field(default=None, max_length=256)


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


class AdapterRegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="Directory of a PEFT LoRA adapter.")
