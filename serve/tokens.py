"""Feedback tokens: a signed, expiring grant to vote on one answer (or choose in one
comparison) without the API key, for a chat product to hand to its user's browser.

A token is `ft1.<payload>.<signature>`, both base64url: the payload is
`kind:id:key id:expiry` (kind `c` for a completion, `x` for a comparison; expiry in
Unix seconds) and the signature its HMAC-SHA256 under the gateways' shared secret
(settings.token_secret, or a random one kept in the database). A token acts as the
answer's owner (its key, its end user) for that one id, until it expires or its key
is revoked (the route checks that, cached like keys).
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from psycopg_pool import AsyncConnectionPool

from ratchet import server_secrets
from ratchet.db import unavailable
from ratchet.settings import Settings
from serve.errors import Unauthorized

log = logging.getLogger(__name__)

Kind = Literal["completion", "comparison"]
_KINDS: dict[Kind, str] = {"completion": "c", "comparison": "x"}
_PREFIX = "ft1"


@dataclass(frozen=True)
class Grant:
    kind: Kind
    id: uuid.UUID
    key_id: uuid.UUID
    expires: int


class FeedbackTokens:
    def __init__(self, secret: bytes, ttl_s: int) -> None:
        if len(secret) < 16:
            raise ValueError("the feedback-token secret must be at least 16 bytes")
        self._secret = secret
        self.ttl_s = ttl_s

    def issue(self, kind: Kind, id_: uuid.UUID, key_id: uuid.UUID) -> str:
        return self.sign(Grant(kind, id_, key_id, int(time.time()) + self.ttl_s))

    def sign(self, grant: Grant) -> str:
        payload = f"{_KINDS[grant.kind]}:{grant.id.hex}:{grant.key_id.hex}:{grant.expires}"
        return f"{_PREFIX}.{_b64(payload.encode())}.{_b64(self._mac(payload.encode()))}"

    def verify(self, token: str, kind: Kind, id_: uuid.UUID | None) -> Grant:
        """The grant, if the token is genuine, unexpired and for this very id; else
        401 (`invalid_feedback_token` or `feedback_token_expired`)."""
        grant = self._parse(token)
        if grant.kind != kind or grant.id != id_:
            raise _invalid(f"This feedback token is not for this {kind}.")
        if grant.expires <= time.time():
            raise Unauthorized(
                "This feedback token has expired; vote with the API key or a new token.",
                param="feedback_token",
                code="feedback_token_expired",
            )
        return grant

    def _parse(self, token: str) -> Grant:
        prefix, _, rest = token.partition(".")
        payload_b64, _, mac_b64 = rest.partition(".")
        try:
            payload, mac = _unb64(payload_b64), _unb64(mac_b64)
        except (binascii.Error, ValueError):
            raise _invalid("Malformed feedback token.") from None
        # The signature first: nothing of an unsigned payload is trusted or parsed.
        if prefix != _PREFIX or not hmac.compare_digest(mac, self._mac(payload)):
            raise _invalid("Invalid feedback token.")
        kind_code, id_hex, key_hex, expires = payload.decode().split(":")
        kind = next(k for k, code in _KINDS.items() if code == kind_code)
        return Grant(kind, uuid.UUID(id_hex), uuid.UUID(key_hex), int(expires))

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()


async def load_secret(settings: Settings, pool: AsyncConnectionPool) -> bytes:
    """The signing secret: the setting, else the one every gateway shares from the
    database (made by the first). With the database down at start-up, a secret of
    this process's own: its tokens then work only here, until it restarts."""
    if settings.token_secret is not None:
        return settings.token_secret.get_secret_value().encode()
    try:
        async with asyncio.timeout(settings.db_acquire_timeout_s), pool.connection() as conn:
            return await server_secrets.get_or_create(conn, server_secrets.FEEDBACK_TOKENS)
    except Exception as exc:
        if not (unavailable(exc) or isinstance(exc, TimeoutError)):
            raise
        log.error(
            "the database is unreachable: feedback tokens are signed with a secret of this "
            "gateway's own until it restarts (set RATCHET_TOKEN_SECRET to avoid this)"
        )
        return secrets.token_bytes(32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or not text.isascii():
        raise ValueError("empty or not ASCII")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _invalid(message: str) -> Unauthorized:
    return Unauthorized(message, param="feedback_token", code="invalid_feedback_token")
