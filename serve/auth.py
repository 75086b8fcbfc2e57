"""Bearer API keys with roles. A checked key is trusted for `auth_cache_seconds`.

The cache keeps Postgres off the hot path; revoking a key takes effect within that
many seconds in every gateway (at once in the gateway that revoked it). While the
database is down, a key this gateway checked within `outage_grace_s` stays usable,
so chats go on; an unknown key then gets 503 (it cannot be checked), not 401.
"""

import time

from psycopg_pool import AsyncConnectionPool

from feedback.errors import StorageUnavailable
from ratchet import keys
from ratchet.db import DatabaseWatch, unavailable
from ratchet.keys import ApiKey, Role
from serve.errors import Forbidden, Unauthorized


class Authenticator:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        ttl: float,
        watch: DatabaseWatch | None = None,
        outage_grace_s: float = 0.0,
    ) -> None:
        self.pool = pool
        self.ttl = ttl
        self.watch = watch
        self.outage_grace_s = outage_grace_s
        # secret -> (trusted until, checked at, key)
        self._cache: dict[str, tuple[float, float, ApiKey]] = {}

    async def authenticate(self, authorization: str | None) -> ApiKey:
        secret = _bearer(authorization)
        hit = self._cache.get(secret)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[2]
        if self.watch is not None and not self.watch.up:
            return self._stale(hit, now)  # do not wait on a database known to be down
        try:
            async with self.pool.connection() as conn:
                key = await keys.find_active(conn, secret)
        except Exception as exc:
            if not unavailable(exc):
                raise
            if self.watch is not None:
                self.watch.failed(exc)
            return self._stale(hit, now)
        if key is None:
            self._cache.pop(secret, None)
            raise Unauthorized("Invalid API key.", code="invalid_api_key")
        if self.ttl > 0 or self.outage_grace_s > 0:
            self._cache[secret] = (now + self.ttl, now, key)
        return key

    def _stale(self, hit: tuple[float, float, ApiKey] | None, now: float) -> ApiKey:
        """The cached key while the database is down, if it was checked recently."""
        if hit is not None and now - hit[1] <= self.outage_grace_s:
            return hit[2]
        raise StorageUnavailable(
            "The database is unavailable, so this API key cannot be checked now; please retry.",
            code="database_unavailable",
        )

    def forget(self) -> None:
        self._cache.clear()


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
