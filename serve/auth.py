"""Bearer API keys with roles. A checked key is trusted for `auth_cache_seconds`.

The cache keeps Postgres off the hot path; revoking a key takes effect within that
many seconds in every gateway (at once in the gateway that revoked it).
"""

import time

from psycopg_pool import AsyncConnectionPool

from ratchet import keys
from ratchet.keys import ApiKey, Role
from serve.errors import Forbidden, Unauthorized


class Authenticator:
    def __init__(self, pool: AsyncConnectionPool, ttl: float) -> None:
        self.pool = pool
        self.ttl = ttl
        self._cache: dict[str, tuple[float, ApiKey]] = {}

    async def authenticate(self, authorization: str | None) -> ApiKey:
        secret = _bearer(authorization)
        hit = self._cache.get(secret)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        async with self.pool.connection() as conn:
            key = await keys.find_active(conn, secret)
        if key is None:
            self._cache.pop(secret, None)
            raise Unauthorized("Invalid API key.", code="invalid_api_key")
        if self.ttl > 0:
            self._cache[secret] = (now + self.ttl, key)
        return key

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
