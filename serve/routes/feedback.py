"""Votes and pairwise choices.

Either an API key (`Authorization: Bearer <key>`) of the key that received the
answer (or an ops key), or the answer's `feedback_token` in the body. Who may vote
as whom: `feedback.voters`.
"""

import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from feedback.errors import (
    AlreadyDecided,
    FeedbackError,
    NotTheOwner,
    StorageUnavailable,
    UnknownComparison,
    UnknownCompletion,
    VoteCapExceeded,
    VoterBusy,
)
from feedback.log import VoteReceipt
from feedback.voters import Caller, VoteRules
from feedback.votes import Ballot
from ratchet.keys import ApiKey
from serve.deps import ChatKey, Services, ServicesDep, requests_window, require
from serve.errors import (
    APIError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    error_body,
    unsupported_parameter,
)
from serve.ids import COMPARISON_ID, COMPLETION_ID
from serve.protocol import (
    WALKED,
    ChoiceRequest,
    ChoiceResponse,
    ComparisonRequest,
    ComparisonResponse,
    FeedbackRequest,
    FeedbackResponse,
)
from serve.quotas import estimate_tokens, quota_headers
from serve.tokens import Kind

router = APIRouter(prefix="/v1", tags=["feedback"])
BATCH_MAX = 100  # votes in one POST /v1/feedback/batch
Authorization = Annotated[str | None, Header()]
# ChatKey's own dependency, called only when no feedback token is sent.
_chat_key = require("chat").dependency


class FeedbackBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Each item is validated on its own, so that one bad item refuses only itself.
    votes: list[Any] = Field(min_length=1, max_length=BATCH_MAX)


@router.post("/feedback")
async def give_feedback(
    request: FeedbackRequest,
    http: Request,
    response: Response,
    services: ServicesDep,
    authorization: Authorization = None,
) -> FeedbackResponse:
    """Thumbs up/down on an answer; a repeat by the same voter replaces the vote.

    Authenticate with the API key that received the answer (or an ops key), or send
    the answer's `feedback_token` in the body instead, e.g. from the end user's
    browser: `{"completion_id": "chatcmpl-…", "rating": "up", "feedback_token":
    "ft1.…"}`. By default only the end user the answer was generated for votes on it
    (`user` unset or that user; another user: 403), so an answer has one live vote.
    Another key's answer is 404, like an unknown id."""
    via = _Via(http, response, services, authorization, request.feedback_token)
    ballot = await _ballot(request, await _caller(via, _target(request), request.user), services)
    (done,) = await _votes(services, [ballot])
    return _answer(request, done, services)


@router.post("/feedback/batch")
async def give_feedback_batch(
    batch: FeedbackBatchRequest,
    http: Request,
    response: Response,
    services: ServicesDep,
    authorization: Authorization = None,
) -> JSONResponse:
    """Up to 100 votes in one call, each checked as `POST /v1/feedback` checks one:
    `{"votes": [{completion_id, rating, ...}, ...]}` → `{"object": "list", "data":
    [{"index", "status", ...}]}`, where each item is what the single call would answer
    (its body, or `error` in OpenAI's shape) with its HTTP status. A refused item stores
    nothing and keeps no other from being stored. One API key for the whole call
    (counted once against its requests per minute); an item may carry its own
    `feedback_token` instead."""
    key = None
    if authorization is not None or any(_token(v) is None for v in batch.votes):
        key = await _chat_key(
            request=http, response=response, services=services, authorization=authorization
        )
    results: list[dict[str, Any] | None] = [None] * len(batch.votes)
    requests: list[FeedbackRequest] = []
    ballots: list[tuple[Ballot, Caller]] = []
    for index, item in enumerate(batch.votes):
        try:
            request = _item(item)
            via = _Via(http, response, services, authorization, request.feedback_token, key)
            caller = await _caller(via, _target(request), request.user)
            ballots.append(await _ballot(request, caller, services))
            requests.append(request)
        except APIError as exc:
            results[index] = _failed(index, exc)
    outcomes = iter(await _votes(services, ballots) if ballots else [])
    pending = iter(requests)
    for index, result in enumerate(results):
        if result is None:
            request, done = next(pending), next(outcomes)
            try:
                vote = _answer(request, done, services)
            except APIError as exc:
                results[index] = _failed(index, exc)
            else:
                results[index] = {"index": index, "status": 200, **vote.model_dump()}
    return JSONResponse({"object": "list", "data": results}, headers=dict(response.headers))


async def _votes(
    services: Services, ballots: list[tuple[Ballot, Caller]]
) -> list[VoteReceipt | FeedbackError]:
    try:
        return await services.answers.votes(ballots, _rules(services))
    except VoterBusy as exc:
        raise TooManyRequests(str(exc), code="voter_busy", retry_after=1) from exc


def _item_error(exc: ValidationError) -> InvalidRequest:
    """A batch item's schema error, worded as the single call's (serve.errors)."""
    errors = exc.errors()
    first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
    parts = [str(p) for p in first.get("loc", ()) if not _union_member(p)]
    param = ".".join(parts) or None
    if first.get("type") == "extra_forbidden" and param:
        return unsupported_parameter(param)
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return InvalidRequest(message, param=param, code="invalid_value")


def _union_member(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


def _token(item: Any) -> str | None:
    token = item.get("feedback_token") if isinstance(item, dict) else None
    return token if isinstance(token, str) else None


def _item(item: Any) -> FeedbackRequest:
    """One vote of a batch, refused as the single call refuses its body."""
    try:
        # As FastAPI does; the batch's body has been through `clean_body` already.
        return FeedbackRequest.model_validate(item, from_attributes=True, context=WALKED)
    except ValidationError as exc:
        raise _item_error(exc) from exc


def _target(request: FeedbackRequest) -> tuple[Kind, uuid.UUID | None]:
    return "completion", COMPLETION_ID.parse(request.completion_id)


async def _ballot(
    request: FeedbackRequest, caller: Caller, services: Services
) -> tuple[Ballot, Caller]:
    """The vote, once its caller is known: an unknown id, then the correction's cap."""
    uid = COMPLETION_ID.parse(request.completion_id)
    if uid is None:
        raise _unknown_completion(request.completion_id)
    _check_correction(request.correction, services.settings.max_correction_chars)
    rating = 1 if request.rating == "up" else -1
    ballot = Ballot(
        completion_id=uid, rating=rating, comment=request.comment, correction=request.correction
    )
    return ballot, caller


def _answer(
    request: FeedbackRequest, done: VoteReceipt | FeedbackError, services: Services
) -> FeedbackResponse:
    """The client's view of one vote's outcome (raising its error)."""
    if isinstance(done, UnknownCompletion):
        raise _unknown_completion(request.completion_id) from done
    if isinstance(done, NotTheOwner):
        raise _not_owner("answer", done) from done
    if isinstance(done, VoteCapExceeded):
        raise _over_cap(done) from done
    if isinstance(done, StorageUnavailable):
        raise Unavailable(done.message, code=done.code, retry_after=done.retry_after) from done
    if isinstance(done, FeedbackError):
        raise done
    services.metrics.votes.labels(request.rating).inc()
    return FeedbackResponse(
        completion_id=request.completion_id,
        rating=request.rating,
        user=done.voter.end_user or None,
        comment=done.comment,
        correction=done.correction,
        updated=done.updated,
    )


def _failed(index: int, exc: APIError) -> dict[str, Any]:
    body = error_body(exc.message, exc.type, exc.param, exc.code)
    return {"index": index, "status": exc.status_code, **body}


@router.post("/comparisons")
async def create_comparison(
    request: ComparisonRequest,
    key: ChatKey,
    services: ServicesDep,
    http: Request,
    response: Response,
) -> ComparisonResponse:
    """Two answers to one request, labelled `a` and `b` in random order.

    Quotas: one of the key's concurrent requests, two engine calls of the gateway's
    in-flight cap, and the tokens of two answers."""
    services.comparisons.check(request)  # a refused request spends no tokens
    cap = services.settings.max_tokens_cap
    cost = 2 * estimate_tokens(request.messages, min(request.max_tokens or cap, cap))
    requests = requests_window(http)
    admission = await services.quotas.admit(key, cost, calls=2, requests=requests)
    with admission.slot:
        created = await services.comparisons.create(request, key)
    response.headers.update(quota_headers(requests, admission.tokens))
    return created


@router.post("/comparisons/{comparison}/choice")
async def choose(
    comparison: str,
    request: ChoiceRequest,
    http: Request,
    response: Response,
    services: ServicesDep,
    authorization: Authorization = None,
) -> ChoiceResponse:
    """Record which answer the user preferred; the first decision stands.

    Authenticate with the key that made the comparison (or an ops key), or send the
    comparison's `feedback_token` in the body instead. Who may choose: as for votes."""
    uid = COMPARISON_ID.parse(comparison)
    via = _Via(http, response, services, authorization, request.feedback_token)
    caller = await _caller(via, ("comparison", uid), request.user)
    if uid is None:
        raise _unknown_comparison(comparison)
    try:
        decided = await services.answers.choice(uid, request.choice, caller, _rules(services))
    except UnknownComparison as exc:
        raise _unknown_comparison(comparison) from exc
    except NotTheOwner as exc:
        raise _not_owner("comparison", exc) from exc
    except AlreadyDecided as exc:
        raise Conflict(
            f"Comparison {comparison} was already decided as {exc.choice!r}.",
            param="choice",
            code="already_decided",
        ) from exc
    except VoteCapExceeded as exc:
        raise _over_cap(exc) from exc
    except VoterBusy as exc:
        raise TooManyRequests(str(exc), code="voter_busy", retry_after=1) from exc
    services.metrics.choices.labels(request.choice).inc()
    return ChoiceResponse(id=COMPARISON_ID.format(uid), choice=decided)


@dataclass
class _Via:
    """How a vote came in: what authenticates it."""

    request: Request
    response: Response
    services: Services
    authorization: str | None
    token: str | None
    key: ApiKey | None = None  # already authenticated (a batch's key)


async def _caller(via: _Via, target: tuple[Kind, uuid.UUID | None], user: str | None) -> Caller:
    """Who votes: the holder of a feedback token for this very id (acting as the
    owner; the token, when sent, is what counts), or a chat (or ops) key, checked
    (and counted) exactly as every other route checks one."""
    if via.token is not None:
        grant = via.services.tokens.verify(via.token, *target)
        # Votes by token count against the answer's key too (at the default rate: the
        # key itself is not looked up), so one token cannot flood the vote path.
        await via.services.quotas.token_votes(grant.key_id)
        if not await via.services.auth.key_active(grant.key_id):
            raise Unauthorized(
                "This feedback token's API key was revoked; its answers take no more votes.",
                code="invalid_feedback_token",
            )
        return Caller(key_id=grant.key_id, user=user, as_owner=True)
    key = via.key or await _chat_key(
        request=via.request,
        response=via.response,
        services=via.services,
        authorization=via.authorization,
    )
    return Caller(key_id=key.id, ops=key.role == "ops", user=user)


def _rules(services: Services) -> VoteRules:
    settings = services.settings
    return VoteRules(settings.votes_per_answer, settings.votes_per_voter_per_day)


def _check_correction(correction: str | None, cap: int) -> None:
    if correction is not None and len(correction) > cap:
        raise InvalidRequest(
            f"The correction has {len(correction)} characters; at most {cap} are accepted.",
            param="correction",
            code="correction_too_long",
        )


def _not_owner(what: str, exc: NotTheOwner) -> Forbidden:
    return Forbidden(
        f"This {what} was generated for another end user: {exc}.",
        param="user",
        code="not_answer_owner",
    )


def _over_cap(exc: VoteCapExceeded) -> TooManyRequests:
    return TooManyRequests(
        f"This voter cast {exc.cap} votes and choices in the last 24 hours, the most "
        "allowed; nothing was stored.",
        code="vote_cap_exceeded",
        retry_after=exc.retry_after,
    )


def _unknown_comparison(value: str) -> NotFound:
    return NotFound(f"No comparison with id {value!r}.", param="id", code="comparison_not_found")


def _unknown_completion(value: str) -> NotFound:
    return NotFound(
        f"No completion with id {value!r}.", param="completion_id", code="completion_not_found"
    )
