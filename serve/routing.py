"""From a public model name (`base`, `production`, `candidate`) to what the engine runs.

The mapping is read from the registry and cached for `registry_cache_seconds`, so
the hot path does not query Postgres on every request. Loading adapters into the
engines is `serve.replicas`' work: the router only says which ones are wanted.
"""

import time
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from ratchet import registry
from ratchet.registry import Adapter
from serve.errors import EngineUnavailable, NotFound
from serve.replicas import EngineSet

PUBLIC_MODELS = ("base", "production", "candidate")


@dataclass(frozen=True)
class Target:
    """What a public model name resolves to right now."""

    public: str
    engine_model: str
    adapter: Adapter | None


class ModelRouter:
    def __init__(self, pool: AsyncConnectionPool, engines: EngineSet, ttl: float) -> None:
        self.pool = pool
        self.engines = engines
        self.ttl = ttl
        self._base: str | None = None
        self._adapters: dict[str, Adapter | None] = {}
        self._expires = 0.0

    def invalidate(self) -> None:
        self._expires = 0.0

    async def resolve(self, public: str) -> Target:
        if public not in PUBLIC_MODELS:
            raise NotFound(
                f"The model `{public}` does not exist. Use one of: {', '.join(PUBLIC_MODELS)}.",
                param="model",
                code="model_not_found",
            )
        adapters = await self._current()
        if public == "base":
            return Target("base", await self.base_name(), None)
        adapter = adapters.get(public)
        if adapter is None:
            if public == "candidate":
                raise NotFound(
                    "There is no candidate model right now.", param="model", code="model_not_found"
                )
            return Target(public, await self.base_name(), None)
        return Target(public, adapter.engine_name, adapter)

    async def available(self) -> list[Target]:
        """The public models that can be called now, in a stable order."""
        adapters = await self._current()
        names = [n for n in PUBLIC_MODELS if n != "candidate" or adapters.get("candidate")]
        base = await self.base_name()
        return [Target(n, a.engine_name if (a := adapters.get(n)) else base, a) for n in names]

    async def base_name(self) -> str:
        if self._base is None:
            models = await self.engines.first().models()
            roots = [m["id"] for m in models if not m.get("parent")]
            if not roots:
                raise EngineUnavailable("engine lists no base model")
            self._base = roots[0]
        return self._base

    async def wanted(self) -> list[Adapter]:
        """The adapters every replica must have loaded before it takes requests."""
        return [a for a in (await self._current()).values() if a is not None]

    async def _current(self) -> dict[str, Adapter | None]:
        now = time.monotonic()
        if now >= self._expires:
            # The engine's base name is re-read as often: an engine redeployed under
            # another name must not leave `base` answering 404 until we restart.
            self._base = None
            async with self.pool.connection() as conn:
                self._adapters = {
                    "production": await registry.production(conn),
                    "candidate": await registry.candidate(conn),
                }
            self._expires = now + self.ttl
        return self._adapters
