"""The router's cached mapping is re-read in the background before it expires, so that
under steady traffic no request waits on the registry or the engine's model listing;
a copy past its life, or invalidated, is never used."""

import asyncio
from typing import Any, cast

from psycopg_pool import AsyncConnectionPool

from ratchet.registry import Adapter
from ratchet.replicas import EngineSet
from serve.routing import ModelRouter

TTL = 0.4


class FakeEngine:
    """Lists one base model, renamed on each listing: base-1, base-2, ..."""

    def __init__(self) -> None:
        self.listings = 0

    async def models(self) -> list[dict[str, Any]]:
        self.listings += 1
        return [{"id": f"base-{self.listings}"}]


class FakeEngines:
    def __init__(self) -> None:
        self.engine = FakeEngine()

    def first(self) -> FakeEngine:
        return self.engine


class Router(ModelRouter):
    """Reads of the registry are counted, and held while `gate` is clear."""

    def __init__(self) -> None:
        self.engines_fake = FakeEngines()
        super().__init__(cast(AsyncConnectionPool, None), cast(EngineSet, self.engines_fake), TTL)
        self.reads = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def _fetch(self) -> dict[str, Adapter | None]:
        self.reads += 1
        await self.gate.wait()
        return {"production": None, "candidate": None}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_fresh_copy_is_used_without_reading() -> None:
    async def run() -> None:
        router = Router()
        assert (await router.resolve("base")).engine_model == "base-1"
        assert (await router.resolve("base")).engine_model == "base-1"
        assert router.reads == 1 and router.engines_fake.engine.listings == 1
        await router.aclose()

    asyncio.run(run())


def test_past_half_its_life_the_copy_is_used_and_re_read_in_the_background() -> None:
    async def run() -> None:
        router = Router()
        await router.resolve("base")
        await asyncio.sleep(TTL * 0.6)
        router.gate.clear()  # the re-read hangs: the request must not wait on it
        target = await asyncio.wait_for(router.resolve("base"), 0.05)
        assert target.engine_model == "base-1"
        await settle()
        assert router.reads == 2
        await router.resolve("base")  # one re-read at a time
        assert router.reads == 2
        router.gate.set()
        await settle()
        # The base name is re-read with the mapping: an engine renamed is seen.
        assert (await router.resolve("base")).engine_model == "base-2"
        await router.aclose()

    asyncio.run(run())


def test_a_copy_past_its_life_is_read_again_before_it_is_used() -> None:
    async def run() -> None:
        router = Router()
        await router.resolve("base")
        await asyncio.sleep(TTL * 1.2)
        router.gate.clear()
        waiting = asyncio.ensure_future(router.resolve("base"))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # it waits for the read
        router.gate.set()
        assert (await waiting).engine_model == "base-2"
        await router.aclose()

    asyncio.run(run())


def test_a_background_read_begun_before_invalidate_does_not_count() -> None:
    async def run() -> None:
        router = Router()
        await router.resolve("base")
        await asyncio.sleep(TTL * 0.6)
        router.gate.clear()
        await router.resolve("base")  # starts the background re-read, held
        await settle()
        router.invalidate()  # e.g. a promotion by this gateway
        router.gate.set()
        await settle()
        reads = router.reads
        await router.resolve("base")
        assert router.reads == reads + 1  # read again, not the earlier one's result
        await router.aclose()

    asyncio.run(run())
