from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from serve.deps import ChatKey, ServicesDep
from serve.protocol import ChatCompletionRequest

router = APIRouter(prefix="/v1", tags=["chat"])


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: ChatCompletionRequest, key: ChatKey, services: ServicesDep
) -> dict[str, Any] | StreamingResponse:
    """OpenAI chat completions on `base`, `production` or `candidate`, logged with provenance."""
    services.chat.check(request)
    target = await services.router.resolve(request.model)
    if not request.stream:
        return await services.chat.complete(request, target, key)
    chunks = await services.chat.open_stream(request, target, key)
    return StreamingResponse(chunks, media_type="text/event-stream")
