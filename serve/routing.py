"""From a public model name (`base`, `production`, `candidate`) to what the engine runs.

The mapping is read from the registry and cached for `registry_cache_seconds`, so
the hot path does not query Postgres on every request. A request that finds the copy
past half its life uses it and starts a re-read in the background, so that under
steady traffic no request waits on the registry (or on the engine's model listing,
re-read with it); a copy is never used past its full life, nor after `invalidate`.
While the database is down, the last mapping read stays in use for up to
`outage_grace_s`. Loading adapters into the engines is `ratchet.replicas`' work: the
router only says which ones are wanted.
"""

import asyncio
import logging
import time
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from feedback.errors import StorageUnavailable
from ratchet import registry
from ratchet.db import DatabaseWatch, unavailable
from ratchet.engine import EngineUnavailable
from ratchet.keys import ApiKey
from ratchet.registry import Adapter
from ratchet.replicas import EngineSet
from serve.errors import NotFound

log = logging.getLogger(__name__)
PUBLIC_MODELS = ("base", "production", "candidate")


def _visible(key: ApiKey | None) -> tuple[str, ...]:
    # `candidate` is an adapter nobody has evaluated yet: only keys with that scope
    # (and reviewers, ops) see it; for the others it is as unknown as any name.
    if key is None or key.may_call_candidate():
        return PUBLIC_MODELS
    return tuple(n for n in PUBLIC_MODELS if n != "candidate")


@dataclass(frozen=True)
class Target:
    """What a public model name resolves to right now."""

    public: str
    engine_model: str
    adapter: Adapter | None


class ModelRouter:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        engines: EngineSet,
        ttl: float,
        watch: DatabaseWatch | None = None,
        outage_grace_s: float = 0.0,
    ) -> None:
        self.pool = pool
        self.engines = engines
        self.ttl = ttl
        self.watch = watch
        self.outage_grace_s = outage_grace_s
        self._base: str | None = None
        self._adapters: dict[str, Adapter | None] = {}
        self._expires = 0.0
        self._read_at: float | None = None
        # Bumped by `invalidate`: a background read begun before it must not count.
        self._generation = 0
        self._ahead: asyncio.Task[None] | None = None

    def invalidate(self) -> None:
        self._expires = 0.0
        self._generation += 1

    async def aclose(self) -> None:
        """Stop a background re-read; call before closing the pool."""
        if self._ahead is not None:
            self._ahead.cancel()
            await asyncio.gather(self._ahead, return_exceptions=True)

    async def resolve(self, public: str, key: ApiKey | None = None) -> Target:
        """`key`: the caller; `candidate` exists only for keys that may call it."""
        names = _visible(key)
        if public not in names:
            raise NotFound(
                f"The model `{public}` does not exist. Use one of: {', '.join(names)}.",
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

    async def available(self, key: ApiKey | None = None) -> list[Target]:
        """The public models that can be called now (by `key`), in a stable order."""
        adapters = await self._current()
        names = [n for n in _visible(key) if n != "candidate" or adapters.get("candidate")]
        base = await self.base_name()
        return [Target(n, a.engine_name if (a := adapters.get(n)) else base, a) for n in names]

    async def base_name(self) -> str:
        if self._base is None:
            self._base = await self._list_base()
        return self._base

    async def wanted(self) -> list[Adapter]:
        """The adapters every replica must have loaded before it takes requests."""
        return [a for a in (await self._current()).values() if a is not None]

    async def _current(self) -> dict[str, Adapter | None]:
        now = time.monotonic()
        if now < self._expires:
            if now >= self._expires - self.ttl / 2 and (self._ahead is None or self._ahead.done()):
                self._ahead = asyncio.create_task(self._read_ahead(), name="registry re-read")
            return self._adapters
        # The engine's base name is re-read as often: an engine redeployed under
        # another name must not leave `base` answering 404 until we restart.
        self._base = None
        try:
            self._adapters = await self._fetch()
        except Exception as exc:
            if not unavailable(exc) and not isinstance(exc, StorageUnavailable):
                raise
            if self._read_at is None or now - self._read_at > self.outage_grace_s:
                raise StorageUnavailable(
                    "The database is unavailable and this gateway has no recent copy of "
                    "which model is production; please retry.",
                    code="database_unavailable",
                ) from exc
            self._expires = now + min(self.ttl, 1.0)  # try again soon, not per request
            return self._adapters
        self._expires, self._read_at = now + self.ttl, now
        return self._adapters

    async def _read_ahead(self) -> None:
        """Re-read the mapping and the base name while the copy is still good; on any
        failure keep the copy (past its life, a request reads it and sees the error)."""
        started, generation = time.monotonic(), self._generation
        try:
            adapters = await self._fetch()
            base = await self._list_base()
        except Exception as exc:
            log.debug("registry re-read failed: %s", exc)
            return
        if generation == self._generation:
            self._adapters, self._base = adapters, base
            self._expires, self._read_at = started + self.ttl, started

    async def _list_base(self) -> str:
        models = await self.engines.first().models()
        roots = [m["id"] for m in models if not m.get("parent")]
        if not roots:
            raise EngineUnavailable("engine lists no base model")
        return str(roots[0])

    async def _fetch(self) -> dict[str, Adapter | None]:
        if self.watch is not None and not self.watch.up:
            raise StorageUnavailable("database down")
        try:
            async with self.pool.connection() as conn:
                return {
                    "production": await registry.production(conn),
                    "candidate": await registry.candidate(conn),
                }
        except Exception as exc:
            if self.watch is not None and unavailable(exc):
                self.watch.failed(exc)
            raise
