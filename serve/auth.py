"""Bearer API keys with roles. A checked key is trusted for `auth_cache_seconds`.

The cache keeps Postgres off the hot path; revoking a key takes effect within that
many seconds in every gateway (at once in the gateway that revoked it). While the
database is down, a key this gateway checked within `outage_grace_s` stays usable,
so chats go on; an unknown key then gets 503 (it cannot be checked), not 401.

A key that was not found is remembered (its sha256 only) for `unknown_ttl` seconds, so
repeating it costs no database read: secrets are random and made only by `ratchet keys
create`, so a secret that was unknown does not become valid later. Failed
authentications are counted per client address by a throttle (serve.quotas); over its
limit, an address gets 429 for keys this gateway does not already trust, before any
lookup. Only a presented key counts as a failure: a missing or malformed header costs
nothing to refuse.
"""

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import NoReturn, Protocol

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from starlette.requests import HTTPConnection

from feedback.errors import StorageUnavailable
from ratchet import keys
from ratchet.db import DatabaseWatch, unavailable
from ratchet.keys import ApiKey, Role
from serve.errors import Forbidden, Unauthorized

Lookup = Callable[[AsyncConnection, str], Awaitable[ApiKey | None]]
_UNKNOWN_MAX = 10_000  # remembered unknown secrets; the oldest go first


class Throttle(Protocol):
    """Counts failed authentications per client address (serve.quotas.Quotas)."""

    async def auth_allowed(self, address: str) -> None: ...

    async def auth_failed(self, address: str) -> None: ...


class Authenticator:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        ttl: float,
        watch: DatabaseWatch | None = None,
        outage_grace_s: float = 0.0,
        *,
        throttle: Throttle | None = None,
        unknown_ttl: float = 60.0,
        lookup: Lookup = keys.find_active,
    ) -> None:
        self.pool = pool
        self.ttl = ttl
        self.watch = watch
        self.outage_grace_s = outage_grace_s
        self.throttle = throttle
        self.unknown_ttl = unknown_ttl
        self.lookup = lookup
        # secret -> (trusted until, checked at, key)
        self._cache: dict[str, tuple[float, float, ApiKey]] = {}
        # key id -> (until when, not revoked): for feedback tokens, which name a key
        self._active: dict[uuid.UUID, tuple[float, bool]] = {}
        # sha256 of a secret that was not found -> until when it is known to be unknown
        self._unknown: dict[str, float] = {}

    async def authenticate(self, authorization: str | None, address: str = "") -> ApiKey:
        """The key behind `authorization`; `address` is the client's, for the throttle."""
        secret = _bearer(authorization)
        hit = self._cache.get(secret)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[2]
        digest = keys.hash_secret(secret)
        if self._unknown.get(digest, 0.0) > now:
            await self._failed(address)
        # Only secrets never seen valid are throttled: a key that worked recently is
        # re-checked, so bad guesses from a shared address (NAT, a proxy) never lock
        # its honest clients out.
        if self.throttle is not None and hit is None:
            await self.throttle.auth_allowed(address)
        if self.watch is not None and not self.watch.up:
            return self._stale(hit, now)  # do not wait on a database known to be down
        try:
            async with self.pool.connection() as conn:
                key = await self.lookup(conn, secret)
        except Exception as exc:
            if not unavailable(exc):
                raise
            if self.watch is not None:
                self.watch.failed(exc)
            return self._stale(hit, now)
        if key is None:
            self._cache.pop(secret, None)
            self._remember_unknown(digest, now)
            await self._failed(address)
        if self.ttl > 0 or self.outage_grace_s > 0:
            self._cache[secret] = (now + self.ttl, now, key)
        return key

    async def key_active(self, key_id: uuid.UUID) -> bool:
        """Whether a key (named by id, e.g. in a feedback token) is still unrevoked;
        cached like keys themselves. While the database is down: yes (the token's
        signature and expiry still hold)."""
        now = time.monotonic()
        hit = self._active.get(key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        if self.watch is not None and not self.watch.up:
            return True
        try:
            async with self.pool.connection() as conn:
                active = await keys.is_active(conn, key_id)
        except Exception as exc:
            if not unavailable(exc):
                raise
            if self.watch is not None:
                self.watch.failed(exc)
            return True
        if len(self._active) >= _UNKNOWN_MAX:
            self._active.clear()  # ids come only from tokens we signed: rarely many
        self._active[key_id] = (now + self.ttl, active)
        return active

    def _stale(self, hit: tuple[float, float, ApiKey] | None, now: float) -> ApiKey:
        """The cached key while the database is down, if it was checked recently."""
        if hit is not None and now - hit[1] <= self.outage_grace_s:
            return hit[2]
        raise StorageUnavailable(
            "The database is unavailable, so this API key cannot be checked now; please retry.",
            code="database_unavailable",
        )

    def _remember_unknown(self, digest: str, now: float) -> None:
        if self.unknown_ttl <= 0:
            return
        self._unknown.pop(digest, None)  # re-inserted last: the dict stays oldest first
        self._unknown[digest] = now + self.unknown_ttl
        while len(self._unknown) > _UNKNOWN_MAX:
            del self._unknown[next(iter(self._unknown))]

    async def _failed(self, address: str) -> NoReturn:
        """401, or 429 once the address is over its failed authentications."""
        if self.throttle is not None:
            await self.throttle.auth_failed(address)
        raise Unauthorized("Invalid API key.", code="invalid_api_key")

    def forget(self) -> None:
        self._cache.clear()
        self._unknown.clear()


def client_address(request: HTTPConnection) -> str:
    """The peer's address, for throttling failed authentications. Behind a proxy,
    uvicorn's --forwarded-allow-ips decides whether X-Forwarded-For replaces it; the
    header is never read here, so a client cannot pick its own address."""
    return request.client.host if request.client else ""


def check_role(key: ApiKey, allowed: tuple[Role, ...]) -> None:
    # ops may call everything; the others only what names them.
    if key.role != "ops" and key.role not in allowed:
        raise Forbidden(
            f"A {key.role!r} key may not call this endpoint; it needs one of: "
            f"{', '.join(allowed)}.",
            code="insufficient_role",
        )


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized(
            "Missing API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized(
            "Malformed Authorization header; expected 'Bearer <key>'.", code="invalid_api_key"
        )
    return secret.strip()
