from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serve.deps import ChatKey, ServicesDep, requests_window
from serve.protocol import ChatCompletionRequest
from serve.quotas import ReleasingStream, estimate_tokens, quota_headers

router = APIRouter(prefix="/v1", tags=["chat"])


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: ChatCompletionRequest,
    key: ChatKey,
    services: ServicesDep,
    http: Request,
) -> JSONResponse | StreamingResponse:
    """OpenAI chat completions on `base`, `production` or `candidate`, logged with provenance.

    The key's tokens are reserved and a concurrency slot taken once the request is
    known to be valid, before the engine is called; the slot is held until the answer
    (a stream's last byte) is sent or the client leaves."""
    services.chat.check(request)
    target = await services.router.resolve(request.model, key)
    cost = estimate_tokens(request.messages, _max_tokens(request, services.settings.max_tokens_cap))
    requests = requests_window(http)
    admission = await services.quotas.admit(key, cost, requests=requests)
    headers = quota_headers(requests, admission.tokens)
    if not request.stream:
        with admission.slot:
            answer = await services.chat.complete(request, target, key)
        # A response, not the dict: FastAPI would walk the engine's JSON through
        # jsonable_encoder first. `headers` holds the requests window `require` set.
        return JSONResponse(answer, headers=headers)
    try:
        chunks = await services.chat.open_stream(request, target, key)
    except BaseException:
        admission.slot.release()
        raise
    return ReleasingStream(
        chunks, admission.slot.release, headers=headers, media_type="text/event-stream"
    )


def _max_tokens(request: ChatCompletionRequest, cap: int) -> int:
    """What the engine may generate: the larger limit the request names, else the cap."""
    named = [n for n in (request.max_tokens, request.max_completion_tokens) if n is not None]
    return min(max(named), cap) if named else cap
