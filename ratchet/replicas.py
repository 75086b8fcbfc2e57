"""Several vLLM replicas behind one gateway, each with the same adapters loaded.

A replica takes requests (`ready`) only while it answers /health *and* lists every
adapter that production and the candidate need. Each replica is checked on its own
schedule (every `interval` seconds), so one that hangs never delays the others'
checks. One that went down is taken out at once when it refuses connections, and
after two missed health checks when it only stops answering (a stopped or wedged
process still accepts connections). One that comes back gets the wanted adapters
loaded again *before* it is marked ready: existing vLLM deployments serve 404s after
a replica restarts because nobody reloads its runtime-loaded adapters.

Requests go round-robin over the ready replicas. A replica that refuses a request
takes no new ones until its next check, and the request moves to the next replica;
a request waiting on a replica that the checks then find hung moves too, when
another replica is ready.
"""

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ratchet.engine import (
    EngineClient,
    EngineError,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
)
from ratchet.registry import Adapter

log = logging.getLogger(__name__)
T = TypeVar("T")
Wanted = Callable[[], Awaitable[Sequence[Adapter]]]
Resolver = Callable[[str], Awaitable[list[str]]]
# A replica that stops answering /health is taken out after this many misses in a
# row: one slow answer under load must not pull the only replica out of rotation.
MISSES_TO_DOWN = 2


class ReplicaEvents(Protocol):
    """What the replica set reports (the gateway turns it into metrics)."""

    def replica_ready(self, url: str, ready: bool) -> None: ...

    def adapter_loaded(self, url: str, reason: str) -> None: ...


class NoEvents:
    def replica_ready(self, url: str, ready: bool) -> None:
        pass

    def adapter_loaded(self, url: str, reason: str) -> None:
        pass


@dataclass
class Replica:
    """One vLLM server as the gateway sees it."""

    client: EngineClient
    ready: bool = False
    healthy: bool = False
    loaded: set[str] = field(default_factory=set)  # adapter names it listed at the last check
    restarts: int = 0  # times it came back after being seen down
    served: int = 0
    last_error: str | None = None
    checked_at: float | None = None
    misses: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Set while the replica is out of rotation; requests waiting on it watch this.
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    _seen_up: bool = False

    @property
    def url(self) -> str:
        return self.client.base_url

    def down(self, error: str) -> None:
        if self.ready or self.healthy:
            log.warning("engine %s is down: %s", self.url, error)
        self.ready = self.healthy = False
        self.loaded.clear()
        self.last_error = error
        self.gone.set()

    def out(self, error: str) -> None:
        """One request failed on it: no new requests until its next check says it is
        fine. Requests already running on it carry on (only the checks, which look at
        the replica itself, set `gone`)."""
        if self.ready:
            log.warning("engine %s out of rotation until its next check: %s", self.url, error)
        self.ready = False
        self.last_error = error

    def up(self) -> None:
        self.ready, self.last_error, self.misses = True, None, 0
        self.gone.clear()

    def view(self, wanted: Sequence[Adapter]) -> dict[str, Any]:
        return {
            "url": self.url,
            "ready": self.ready,
            "healthy": self.healthy,
            "adapters": sorted(self.loaded),
            "missing": sorted(a.engine_name for a in wanted if a.engine_name not in self.loaded),
            "restarts": self.restarts,
            "served": self.served,
            "last_error": self.last_error,
            "checked_at": self.checked_at,
        }


async def resolve_dns(host: str) -> list[str]:
    """Every address of a name: a headless Service's name gives one per ready pod."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class EngineSet:
    """The replicas, their checks and the choice of one per request."""

    def __init__(
        self,
        urls: Sequence[str],
        events: ReplicaEvents | None = None,
        *,
        interval: float = 2.0,
        discover: bool = False,
        resolve: Resolver = resolve_dns,
        client_factory: Callable[[str], EngineClient] = EngineClient,
    ) -> None:
        if not urls:
            raise ValueError("EngineSet needs at least one engine URL")
        self.seeds = [u.rstrip("/") for u in urls]
        self.events: ReplicaEvents = events or NoEvents()
        self.interval = interval
        self.discover = discover
        self.resolve = resolve
        self.client_factory = client_factory
        self.replicas: dict[str, Replica] = {}
        if not discover:
            for url in self.seeds:
                self.replicas[url] = Replica(client_factory(url))
        self._turn = itertools.count()
        self._wanted: Wanted | None = None
        self._last_wanted: Sequence[Adapter] = ()
        self._discovery: asyncio.Task[None] | None = None

    def reachable(self) -> list[EngineClient]:
        """Replicas that answered their last check: a promotion loads into each of
        these; one that is down gets production when it comes back."""
        return [r.client for r in self.replicas.values() if r.healthy]

    def first(self) -> EngineClient:
        """Some replica, for calls that any of them can answer (the base model's name)."""
        ready = [r for r in self.replicas.values() if r.ready] or [
            r for r in self.replicas.values() if r.healthy
        ]
        if not ready:
            raise EngineUnavailable("no engine replica is up")
        return ready[0].client

    def start(self, wanted: Wanted) -> None:
        """Check every replica on its own schedule from now on."""
        self._wanted = wanted
        for replica in self.replicas.values():
            self._watch(replica)
        if self.discover:
            self._discovery = asyncio.create_task(self._discover_loop(), name="engine-discovery")

    async def aclose(self) -> None:
        tasks = [r.task for r in self.replicas.values() if r.task] + (
            [self._discovery] if self._discovery else []
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for replica in self.replicas.values():
            await replica.client.aclose()

    def _watch(self, replica: Replica) -> None:
        if self._wanted is not None and replica.task is None:
            replica.task = asyncio.create_task(self._loop(replica), name=f"engine {replica.url}")

    async def _loop(self, replica: Replica) -> None:
        while True:
            try:
                await self._check(replica, await self._current_wanted())
            except Exception:  # never let one bad pass end the checks
                log.exception("engine check of %s failed", replica.url)
            await asyncio.sleep(self.interval)

    async def _current_wanted(self) -> Sequence[Adapter]:
        """What must be loaded; the last known list while the registry cannot be read."""
        assert self._wanted is not None
        try:
            self._last_wanted = await self._wanted()
        except Exception as exc:
            log.warning("cannot read the wanted adapters (%s); using the last known", exc)
        return self._last_wanted

    async def reconcile(self, wanted: Sequence[Adapter], wait: float | None = None) -> None:
        """Check every replica now (those not being checked already), concurrently;
        return after `wait` seconds at most, leaving slower checks to finish alone."""
        self._last_wanted = wanted
        if self.discover:
            await self._discover()
        checks = [
            asyncio.ensure_future(self._check(r, wanted))
            for r in list(self.replicas.values())
            if not r.lock.locked()
        ]
        if checks:
            await asyncio.wait(checks, timeout=wait)

    async def _discover_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self._discover()
            await asyncio.sleep(self.interval)

    async def _discover(self) -> None:
        found: set[str] = set()
        for seed in self.seeds:
            parts = urlsplit(seed)
            try:
                addresses = await self.resolve(parts.hostname or "")
            except OSError as exc:
                log.warning("cannot resolve %s: %s", parts.hostname, exc)
                continue
            for address in addresses:
                host = f"[{address}]" if ":" in address else address
                netloc = f"{host}:{parts.port}" if parts.port else host
                found.add(urlunsplit(parts._replace(netloc=netloc)))
        for url in found - set(self.replicas):
            log.info("engine %s discovered", url)
            self.replicas[url] = replica = Replica(self.client_factory(url))
            self._watch(replica)
        for url in set(self.replicas) - found:
            log.info("engine %s is gone from discovery", url)
            gone = self.replicas.pop(url)
            if gone.task:
                gone.task.cancel()
            gone.down("gone from discovery")
            await gone.client.aclose()

    async def _check(self, replica: Replica, wanted: Sequence[Adapter]) -> None:
        async with replica.lock:
            replica.checked_at = time.time()
            try:
                alive = await replica.client.health()
                if alive:
                    await self._load_missing(replica, wanted)
            except EngineUnavailable as exc:  # it answered /health, then hung or left
                alive, replica.last_error = False, str(exc)
            except EngineError as exc:  # it refused an adapter: up, but not ready
                replica.ready, replica.last_error = False, str(exc)
                log.warning("engine %s is not ready: %s", replica.url, exc)
                alive = True
            if not alive:
                replica.misses += 1
                if replica.misses >= MISSES_TO_DOWN or not replica.healthy:
                    replica.down(f"no answer from the engine ({replica.misses} checks in a row)")
            self.events.replica_ready(replica.url, replica.ready)

    async def _load_missing(self, replica: Replica, wanted: Sequence[Adapter]) -> None:
        # The listing is part of the check: a replica that froze right after answering
        # /health must count as a miss within the health timeout, not the admin one.
        models = await replica.client.models(replica.client.timeouts.health)
        listed = {m["id"] for m in models if m.get("parent")}
        if replica.ready and any(a.engine_name not in listed for a in wanted):
            # Healthy, yet an adapter is gone: it restarted between two checks.
            log.warning("engine %s lost its adapters; reloading", replica.url)
            replica.ready = False
        if not replica.healthy and replica._seen_up:
            replica.restarts += 1
        replica.healthy = replica._seen_up = True
        for adapter in wanted:
            if adapter.engine_name not in listed:
                await self._load(replica, adapter, "reconcile")
                listed.add(adapter.engine_name)
        replica.loaded = listed
        if not replica.ready:
            log.info("engine %s ready with %d adapter(s)", replica.url, len(listed))
        replica.up()

    async def _load(self, replica: Replica, adapter: Adapter, reason: str) -> None:
        try:
            await replica.client.load_adapter(adapter.engine_name, adapter.path)
        except EngineRejected as exc:
            if "already" not in exc.message:  # a racing load by another gateway
                raise
        self.events.adapter_loaded(replica.url, reason)

    async def ensure_loaded(self, replica: Replica, adapter: Adapter) -> None:
        """Normally a no-op: the checks loaded it. After a switch of production (or a
        restart between two checks) the first request loads it."""
        if adapter.engine_name in replica.loaded:
            return
        async with replica.lock:
            if adapter.engine_name in replica.loaded:
                return
            listed = {m["id"] for m in await replica.client.models()}
            if adapter.engine_name not in listed:
                await self._load(replica, adapter, "request")
            replica.loaded.add(adapter.engine_name)

    def _choose(self, tried: set[str]) -> Replica | None:
        ready = [r for r in self.replicas.values() if r.ready and r.url not in tried]
        return ready[next(self._turn) % len(ready)] if ready else None

    async def call(
        self, adapter: Adapter | None, work: Callable[[EngineClient], Awaitable[T]]
    ) -> tuple[T, str]:
        """Run `work` on a ready replica with `adapter` loaded; return its result and
        the replica's URL. A replica that cannot be reached, or that the checks find
        hung while we wait on it, is left for the next one; one that forgot the
        adapter gets it again, once. `work` must be safe to repeat elsewhere."""
        tried: set[str] = set()
        while True:
            replica = self._choose(tried)
            if replica is None:
                raise EngineUnavailable(f"no engine replica is ready ({len(tried)} tried)")
            tried.add(replica.url)
            try:
                result = await self._on(replica, adapter, work, tried)
            except EngineTimeout as exc:
                # Out of rotation like a refusal, but not repeated elsewhere: a call
                # that ran into its total timeout would only do so again.
                replica.out(str(exc))
                self.events.replica_ready(replica.url, False)
                raise
            except EngineUnavailable as exc:
                replica.out(str(exc))
                self.events.replica_ready(replica.url, False)
                continue
            replica.served += 1
            return result, replica.url

    async def _on(
        self,
        replica: Replica,
        adapter: Adapter | None,
        work: Callable[[EngineClient], Awaitable[T]],
        tried: set[str],
    ) -> T:
        attempt = asyncio.ensure_future(self._attempt(replica, adapter, work))
        try:
            while True:
                gone = asyncio.ensure_future(replica.gone.wait())
                try:
                    await asyncio.wait({attempt, gone}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    gone.cancel()
                if attempt.done():
                    return attempt.result()
                if self._choose(tried) is None:
                    # Nowhere else to go: keep waiting; the call's own timeout bounds it.
                    await asyncio.wait({attempt}, timeout=self.interval)
                    if attempt.done():
                        return attempt.result()
                    continue
                raise EngineUnavailable(f"engine {replica.url} stopped answering", replica.url)
        finally:
            if not attempt.done():  # moved elsewhere, or the caller was cancelled
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)

    async def _attempt(
        self,
        replica: Replica,
        adapter: Adapter | None,
        work: Callable[[EngineClient], Awaitable[T]],
    ) -> T:
        if adapter is not None:
            await self.ensure_loaded(replica, adapter)
        try:
            return await work(replica.client)
        except EngineRejected as exc:
            if adapter is None or exc.status_code != 404:
                raise
            replica.loaded.discard(adapter.engine_name)
            await self.ensure_loaded(replica, adapter)
            return await work(replica.client)
