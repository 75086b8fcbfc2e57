import time

from fastapi import APIRouter

from serve.deps import ChatKey, ServicesDep
from serve.protocol import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])
_STARTED = int(time.time())


@router.get("/models")
async def list_models(_: ChatKey, services: ServicesDep) -> ModelList:
    """The public model names callable now; `candidate` only while one exists."""
    targets = await services.router.available()
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
