from fastapi import APIRouter

from feedback.errors import AlreadyDecided, UnknownComparison, UnknownCompletion
from serve.deps import ChatKey, ServicesDep
from serve.errors import Conflict, NotFound
from serve.ids import COMPARISON_ID, COMPLETION_ID
from serve.protocol import (
    ChoiceRequest,
    ChoiceResponse,
    ComparisonRequest,
    ComparisonResponse,
    FeedbackRequest,
    FeedbackResponse,
)

router = APIRouter(prefix="/v1", tags=["feedback"])


@router.post("/feedback")
async def give_feedback(
    request: FeedbackRequest, key: ChatKey, services: ServicesDep
) -> FeedbackResponse:
    """Thumbs up/down on an answer; a repeat by the same user replaces the vote."""
    uid = COMPLETION_ID.parse(request.completion_id)
    if uid is None:
        raise _unknown_completion(request.completion_id)
    try:
        vote = await services.answers.vote(
            completion_id=uid,
            rating=1 if request.rating == "up" else -1,
            end_user=request.user or "",
            key_id=key.id,
            comment=request.comment,
            correction=request.correction,
        )
    except UnknownCompletion as exc:
        raise _unknown_completion(request.completion_id) from exc
    services.metrics.votes.labels(request.rating).inc()
    return FeedbackResponse(
        completion_id=request.completion_id,
        rating=request.rating,
        user=request.user,
        comment=vote.comment,
        correction=vote.correction,
        updated=vote.updated,
    )


@router.post("/comparisons")
async def create_comparison(
    request: ComparisonRequest, key: ChatKey, services: ServicesDep
) -> ComparisonResponse:
    """Two answers to one request, labelled `a` and `b` in random order."""
    return await services.comparisons.create(request, key)


@router.post("/comparisons/{comparison}/choice")
async def choose(
    comparison: str, request: ChoiceRequest, _: ChatKey, services: ServicesDep
) -> ChoiceResponse:
    """Record which answer the user preferred; the first decision stands."""
    uid = COMPARISON_ID.parse(comparison)
    if uid is None:
        raise NotFound(
            f"No comparison with id {comparison!r}.", param="id", code="comparison_not_found"
        )
    try:
        decided = await services.answers.choice(uid, request.choice, request.user or "")
    except UnknownComparison as exc:
        raise NotFound(
            f"No comparison with id {comparison!r}.", param="id", code="comparison_not_found"
        ) from exc
    except AlreadyDecided as exc:
        raise Conflict(
            f"Comparison {comparison} was already decided as {exc.choice!r}.",
            param="choice",
            code="already_decided",
        ) from exc
    services.metrics.choices.labels(request.choice).inc()
    return ChoiceResponse(id=COMPARISON_ID.format(uid), choice=decided)


def _unknown_completion(value: str) -> NotFound:
    return NotFound(
        f"No completion with id {value!r}.", param="completion_id", code="completion_not_found"
    )
