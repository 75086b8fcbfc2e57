"""Pairwise A/B comparisons: one request, two answers in random order, a blind choice.

By default the two answers come from `production` and `candidate`; with no
candidate, or for a key without the `candidate` scope, from two samples of
`production`. Which model stood behind `a` and `b` is stored in the log, never shown.
"""

import asyncio
import random
import uuid

from ratchet.keys import ApiKey
from serve.chat import ChatService
from serve.ids import COMPARISON_ID
from serve.protocol import (
    ChatCompletionRequest,
    ComparisonAnswer,
    ComparisonRequest,
    ComparisonResponse,
)
from serve.routing import ModelRouter


class ComparisonService:
    def __init__(
        self,
        chat: ChatService,
        router: ModelRouter,
        rng: random.Random | None = None,
    ) -> None:
        self.chat = chat
        self.router = router
        self.rng = rng or random.SystemRandom()

    def check(self, request: ComparisonRequest) -> None:
        """Refuse what the engine must never see, before any quota is spent on it."""
        self.chat.check(_as_chat(request, "production"))

    async def create(self, request: ComparisonRequest, key: ApiKey) -> ComparisonResponse:
        models = await self._contenders(key)
        chats = [_as_chat(request, m) for m in models]
        for chat in chats:
            self.chat.check(chat)
        targets = [await self.router.resolve(m, key) for m in models]
        # A task group: if one answer fails, the other's engine call is cancelled too.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self.chat.generate(c, t, key))
                    for c, t in zip(chats, targets, strict=True)
                ]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the client sees the first failure
        results = [task.result() for task in tasks]
        self.rng.shuffle(results)
        (resp_a, rec_a), (resp_b, rec_b) = results
        uid = uuid.uuid4()
        # One write: both answers and the comparison exist together or not at all.
        await self.chat.answers.comparison(
            rec_a, rec_b, comparison_id=uid, key_id=key.id, end_user=request.user
        )
        tokens = self.chat.tokens
        return ComparisonResponse(
            id=COMPARISON_ID.format(uid),
            a=_answer(resp_a),
            b=_answer(resp_b),
            feedback_token=tokens.issue("comparison", uid, key.id) if tokens else None,
        )

    async def _contenders(self, key: ApiKey) -> tuple[str, str]:
        listed = {t.public for t in await self.router.available(key)}
        return (
            ("production", "candidate") if "candidate" in listed else ("production", "production")
        )


def _answer(response: dict[str, object]) -> ComparisonAnswer:
    choice = response["choices"][0]  # type: ignore[index]
    return ComparisonAnswer(message=choice["message"], finish_reason=choice.get("finish_reason"))


def _as_chat(request: ComparisonRequest, model: str) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=model, **request.model_dump(exclude_unset=True))
