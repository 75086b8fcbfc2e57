import time

from fastapi import APIRouter

from serve.deps import ChatKey, ServicesDep
from serve.protocol import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])
_STARTED = int(time.time())


@router.get("/models")
async def list_models(key: ChatKey, services: ServicesDep) -> ModelList:
    """The public model names this key may call now; `candidate` only while one exists
    and only for keys with the `candidate` scope."""
    targets = await services.router.available(key)
    return ModelList(
        data=[
            ModelCard(
                id=t.public,
                created=int(t.adapter.created_at.timestamp()) if t.adapter else _STARTED,
                parent=None if t.public == "base" else "base",
            )
            for t in targets
        ]
    )
