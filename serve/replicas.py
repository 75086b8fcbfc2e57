"""Several vLLM replicas behind one gateway, each with the same adapters loaded.

A replica takes requests (`ready`) only while it answers /health *and* lists every
adapter that production and the candidate need. A reconcile pass, every
`engine_check_interval_s` and on each /readyz, checks each replica: one that went
down is taken out at once; one that comes back (a restart, a new pod) gets the
wanted adapters loaded again *before* it is marked ready. Existing vLLM
deployments serve 404s after a replica restarts because nobody reloads its
runtime-loaded adapters; this is the piece that does.

Requests go round-robin over the ready replicas. A replica that refuses the
connection is marked down and the request moves to the next one, so a restart
costs no failed requests while another replica is up.
"""

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ratchet.registry import Adapter
from serve.engine import EngineClient
from serve.errors import EngineError, EngineUnavailable
from serve.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
Wanted = Callable[[], Awaitable[Sequence[Adapter]]]
Resolver = Callable[[str], Awaitable[list[str]]]


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
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _seen_up: bool = False

    @property
    def url(self) -> str:
        return self.client.base_url

    def down(self, error: str) -> None:
        if self.ready:
            log.warning("engine %s is down: %s", self.url, error)
        self.ready = self.healthy = False
        self.loaded.clear()
        self.last_error = error

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
    """The replicas, their reconciliation and the choice of one per request."""

    def __init__(
        self,
        urls: Sequence[str],
        metrics: Metrics,
        *,
        interval: float = 2.0,
        discover: bool = False,
        resolve: Resolver = resolve_dns,
        client_factory: Callable[[str], EngineClient] = EngineClient,
    ) -> None:
        if not urls:
            raise ValueError("EngineSet needs at least one engine URL")
        self.seeds = [u.rstrip("/") for u in urls]
        self.metrics = metrics
        self.interval = interval
        self.discover = discover
        self.resolve = resolve
        self.client_factory = client_factory
        self.replicas: dict[str, Replica] = {}
        if not discover:
            for url in self.seeds:
                self.replicas[url] = Replica(client_factory(url))
        self._turn = itertools.count()
        self._task: asyncio.Task[None] | None = None

    @property
    def clients(self) -> list[EngineClient]:
        return [r.client for r in self.replicas.values()]

    def reachable(self) -> list[EngineClient]:
        """Replicas that answered their last check: a promotion loads into each of
        these; one that is down gets production when it comes back."""
        return [r.client for r in self.replicas.values() if r.healthy]

    def first(self) -> EngineClient:
        """Some replica, for calls that any of them can answer (the base model's name)."""
        ready = [r for r in self.replicas.values() if r.ready] or list(self.replicas.values())
        if not ready:
            raise EngineUnavailable("no engine replica is known yet")
        return ready[0].client

    def start(self, wanted: Wanted) -> None:
        self._task = asyncio.create_task(self._loop(wanted), name="engine-reconcile")

    async def aclose(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for replica in self.replicas.values():
            await replica.client.aclose()

    async def _loop(self, wanted: Wanted) -> None:
        while True:
            try:
                await self.reconcile(await wanted())
            except Exception:  # the database may be away for a moment: try again
                log.exception("engine reconcile pass failed")
            await asyncio.sleep(self.interval)

    async def reconcile(self, wanted: Sequence[Adapter]) -> None:
        """Check every replica once; load what is missing before marking it ready."""
        if self.discover:
            await self._discover()
        await asyncio.gather(*(self._check(r, wanted) for r in list(self.replicas.values())))
        for replica in self.replicas.values():
            self.metrics.engine_ready.labels(replica.url).set(1 if replica.ready else 0)

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
            self.replicas[url] = Replica(self.client_factory(url))
        for url in set(self.replicas) - found:
            log.info("engine %s is gone from discovery", url)
            await self.replicas.pop(url).client.aclose()

    async def _check(self, replica: Replica, wanted: Sequence[Adapter]) -> None:
        async with replica.lock:
            replica.checked_at = time.time()
            if not await replica.client.health():
                replica.down("no answer on /health")
                return
            try:
                listed = {m["id"] for m in await replica.client.models() if m.get("parent")}
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
            except (EngineError, EngineUnavailable) as exc:
                replica.ready = False
                replica.last_error = f"{exc}"
                log.warning("engine %s is not ready: %s", replica.url, exc)
                return
            replica.loaded = listed
            if not replica.ready:
                log.info("engine %s ready with %d adapter(s)", replica.url, len(listed))
            replica.ready, replica.last_error = True, None

    async def _load(self, replica: Replica, adapter: Adapter, reason: str) -> None:
        try:
            await replica.client.load_adapter(adapter.engine_name, adapter.path)
        except EngineError as exc:
            if "already" not in exc.message:  # a racing load by another gateway
                raise
        self.metrics.adapter_loads.labels(replica.url, reason).inc()

    async def ensure_loaded(self, replica: Replica, adapter: Adapter) -> None:
        """Normally a no-op: the reconcile pass loaded it. After a switch of production
        (or a restart between two checks) the first request loads it."""
        if adapter.engine_name in replica.loaded:
            return
        async with replica.lock:
            if adapter.engine_name in replica.loaded:
                return
            listed = {m["id"] for m in await replica.client.models()}
            if adapter.engine_name not in listed:
                await self._load(replica, adapter, "request")
            replica.loaded.add(adapter.engine_name)

    def _choose(self, tried: set[str]) -> Replica:
        ready = [r for r in self.replicas.values() if r.ready and r.url not in tried]
        if not ready:
            down = ", ".join(sorted(self.replicas)) or "none configured"
            raise EngineUnavailable(f"no engine replica is ready ({down})")
        return ready[next(self._turn) % len(ready)]

    async def call(
        self, adapter: Adapter | None, work: Callable[[EngineClient], Awaitable[T]]
    ) -> tuple[T, str]:
        """Run `work` on a ready replica with `adapter` loaded; return its result and
        the replica's URL. A replica that cannot be reached is marked down and the
        next one is tried; one that forgot the adapter gets it again, once."""
        tried: set[str] = set()
        while True:
            replica = self._choose(tried)
            tried.add(replica.url)
            try:
                if adapter is not None:
                    await self.ensure_loaded(replica, adapter)
                try:
                    result = await work(replica.client)
                except EngineError as exc:
                    if adapter is None or exc.status_code != 404:
                        raise
                    replica.loaded.discard(adapter.engine_name)
                    await self.ensure_loaded(replica, adapter)
                    result = await work(replica.client)
            except EngineUnavailable as exc:
                replica.down(str(exc))
                continue
            replica.served += 1
            return result, replica.url
