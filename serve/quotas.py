"""Per-key quotas, the gateway's in-flight cap and failed-authentication throttling.

Limit                       counted                              where the count lives
requests per minute (rpm)   every authenticated call             `ratelimit_storage`
tokens per minute (tpm)     chat completions and comparisons     `ratelimit_storage`
concurrency                 chat completions and comparisons     this gateway
in-flight cap               engine calls, all keys together      this gateway
failed authentications      wrong keys, per client address       `ratelimit_storage`
token votes                 votes and choices sent with a        `ratelimit_storage`
                            feedback token, per answer key

A key's own rpm, tpm and concurrency (`ratchet keys create --rpm ...`) win; None means
the settings' default. Requests and failed authentications count in a moving window
(exact: one entry per request). Tokens count in a sliding window counter: a moving
window would store one entry per token.

Tokens are reserved before the engine call and not given back: the engine may stop
early, but the reservation is what the key asked the engine to be ready for. A
request is estimated as a quarter of the UTF-8 bytes of its messages as JSON, rounded
up, plus its max_tokens (the server's cap when it names none); a comparison costs two
answers. Like OpenAI's own estimate, it needs no tokenizer and errs on the high side
for English (about 4 characters a token) and low side for text that is dense in tokens.

The concurrency slot is held for the life of the request, a streamed answer's until
its body ends or the client leaves (see `ReleasingStream`).

If the storage cannot be reached (a redis:// that is down), requests and tokens are
not counted (logged) rather than every request refused: the per-gateway concurrency
and in-flight caps still bound what a key can take from the engines.
"""

import json
import logging
import math
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import SlidingWindowCounterSupport
from limits.aio.strategies import (
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import StorageError
from limits.storage import storage_from_string
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ratchet.keys import ApiKey
from ratchet.settings import Settings
from serve.errors import TooManyRequests
from serve.metrics import Metrics

log = logging.getLogger(__name__)
WINDOW_S = 60  # every limit here is per minute
_NAMESPACE = "ratchet"
Limit = Literal["requests", "tokens", "concurrency", "in_flight", "auth_failures", "token_votes"]


@dataclass(frozen=True)
class Window:
    """One limit's state, as the x-ratelimit-* headers show it."""

    limit: int
    remaining: int
    reset_s: float  # seconds until the window next frees room


def duration(seconds: float) -> str:
    """A reset time the way OpenAI writes it: '20ms', '1s', '6m0s', '1h0m0s'."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def quota_headers(requests: Window | None, tokens: Window | None) -> dict[str, str]:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens} headers."""
    headers: dict[str, str] = {}
    for kind, window in (("requests", requests), ("tokens", tokens)):
        if window is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, window.remaining))
            headers[f"x-ratelimit-reset-{kind}"] = duration(window.reset_s)
    return headers


def estimate_tokens(messages: Sequence[BaseModel], max_tokens: int) -> int:
    """What a request may cost: its messages (a quarter of their UTF-8 bytes as JSON,
    rounded up) plus the most it may generate."""
    text = json.dumps([m.model_dump(exclude_none=True) for m in messages], ensure_ascii=False)
    return -(-len(text.encode(errors="replace")) // 4) + max_tokens


def tokens_wait(previous: int, current: int, limit: int, cost: int, now: float) -> float:
    """Seconds until `cost` fits in a sliding window counter if nothing else is spent.

    The counter is `previous * (time left in this window) / W + current`, with windows
    aligned to multiples of W (as `limits` keys them)."""
    left = WINDOW_S - now % WINDOW_S
    room = limit - cost
    if current <= room:
        if previous == 0:
            return 0.0
        return max(0.0, left - (room - current) * WINDOW_S / previous)
    # This window's own count is too much: it must become the previous one and decay.
    return left + WINDOW_S * (1 - room / current)


class Slot:
    """A key's concurrency slot and its engine calls' share of the in-flight cap.
    `release` may be called any number of times; only the first counts."""

    def __init__(self, quotas: "Quotas", key_id: uuid.UUID, calls: int) -> None:
        self._quotas = quotas
        self._key_id = key_id
        self._calls = calls
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._quotas._give_back(self._key_id, self._calls)

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


@dataclass
class Admission:
    """A request let in: its slot (release it when the answer ends) and its tokens."""

    slot: Slot
    tokens: Window


class Quotas:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        uri = settings.ratelimit_storage
        # `limits` names its asyncio storages async+memory://, async+redis://...
        storage = storage_from_string(
            uri if uri.startswith("async+") else f"async+{uri}", wrap_exceptions=True
        )
        self.requests = MovingWindowRateLimiter(storage)
        self.tokens = SlidingWindowCounterRateLimiter(storage)
        self.in_flight = 0
        self.by_key: dict[uuid.UUID, int] = {}

    # --- requests per minute ---

    async def request(self, key: ApiKey) -> Window:
        """Count one call by `key`; 429 if it is over its requests per minute."""
        item = _per_minute(key.rpm or self.settings.default_rpm)
        allowed = await _hit(self.requests, item, 1, "requests", str(key.id))
        window = await _window(self.requests, item, "requests", str(key.id))
        if not allowed:
            raise self._refused(
                "requests",
                f"Rate limit reached for this key on requests per min (RPM): Limit "
                f"{item.amount}, Used {item.amount - window.remaining}, Requested 1. "
                f"Please try again in {duration(window.reset_s)}.",
                window.reset_s,
                quota_headers(window, await self.tokens_window(key)),
            )
        return window

    async def token_votes(self, key_id: uuid.UUID) -> None:
        """Count one vote or choice sent with a feedback token of `key_id`'s answers;
        429 past the default requests per minute (a counter of its own)."""
        item = _per_minute(self.settings.default_rpm)
        if not await _hit(self.requests, item, 1, "token-votes", str(key_id)):
            window = await _window(self.requests, item, "token-votes", str(key_id))
            raise self._refused(
                "token_votes",
                f"Too many votes sent with feedback tokens of this key's answers: Limit "
                f"{item.amount} per minute. Please try again in {duration(window.reset_s)}.",
                window.reset_s,
            )

    # --- tokens, concurrency and the in-flight cap ---

    async def admit(
        self, key: ApiKey, tokens: int, calls: int = 1, requests: Window | None = None
    ) -> Admission:
        """Let in a request that makes `calls` engine calls and may cost `tokens`: take
        a concurrency slot, then reserve the tokens. 429 if either is over its limit.
        `requests`: the key's requests window, for the headers of a 429."""
        try:
            slot = self._take(key, calls)
        except TooManyRequests as refused:
            refused.extra_headers = quota_headers(requests, await self.tokens_window(key))
            raise
        try:
            window = await self._reserve(key, tokens, requests)
        except BaseException:
            slot.release()
            raise
        return Admission(slot, window)

    async def tokens_window(self, key: ApiKey) -> Window:
        item = _per_minute(key.tpm or self.settings.default_tpm)
        return await _window(self.tokens, item, "tokens", str(key.id))

    def _take(self, key: ApiKey, calls: int) -> Slot:
        cap = self.settings.max_in_flight
        if self.in_flight + calls > cap:
            raise self._refused(
                "in_flight",
                f"This gateway is at its cap of {cap} requests in flight (all keys "
                "together). Please retry in a moment.",
                1,
            )
        limit = key.concurrency or self.settings.default_concurrency
        if self.by_key.get(key.id, 0) >= limit:
            raise self._refused(
                "concurrency",
                f"Too many concurrent requests for this key: Limit {limit} in flight. "
                "Please retry when one of them has ended.",
                1,
            )
        self.in_flight += calls
        self.by_key[key.id] = self.by_key.get(key.id, 0) + 1
        return Slot(self, key.id, calls)

    def _give_back(self, key_id: uuid.UUID, calls: int) -> None:
        self.in_flight -= calls
        held = self.by_key.get(key_id, 0) - 1
        if held > 0:
            self.by_key[key_id] = held
        else:
            self.by_key.pop(key_id, None)  # idle keys take no memory

    async def _reserve(self, key: ApiKey, tokens: int, requests: Window | None) -> Window:
        item = _per_minute(key.tpm or self.settings.default_tpm)
        if tokens > item.amount:
            # OpenAI answers this with a 429 too; waiting will not help, a smaller request will.
            raise self._refused(
                "tokens",
                f"Request too large for this key's tokens per min (TPM): Limit {item.amount}, "
                f"Requested {tokens} (the messages' estimate plus max_tokens). Lower "
                "max_tokens or shorten the messages.",
                WINDOW_S,
                quota_headers(requests, await self.tokens_window(key)),
            )
        if await _hit(self.tokens, item, tokens, "tokens", str(key.id)):
            return await _window(self.tokens, item, "tokens", str(key.id))
        window = await _window(self.tokens, item, "tokens", str(key.id))
        wait = await self._tokens_wait(item, tokens, str(key.id))
        raise self._refused(
            "tokens",
            f"Rate limit reached for this key on tokens per min (TPM): Limit {item.amount}, "
            f"Used {item.amount - window.remaining}, Requested {tokens}. Please try again "
            f"in {duration(wait)}.",
            wait,
            quota_headers(requests, window),
        )

    async def _tokens_wait(self, item: RateLimitItem, cost: int, key_id: str) -> float:
        storage = cast(SlidingWindowCounterSupport, self.tokens.storage)
        try:
            previous, _, current, _ = await storage.get_sliding_window(
                item.key_for("tokens", key_id), item.get_expiry()
            )
        except StorageError:
            return WINDOW_S
        return tokens_wait(previous, current, item.amount, cost, time.time())

    # --- failed authentications, per client address ---

    async def auth_allowed(self, address: str) -> None:
        """429 while `address` is over its failed authentications (checked before a
        key is looked up, so that a flood of guesses costs no database reads)."""
        item = _per_minute(self.settings.auth_failures_per_minute)
        try:
            allowed = await self.requests.test(item, "auth", address)
        except StorageError as exc:
            log.warning("rate-limit storage unavailable, not counting: %s", exc)
            return
        if not allowed:
            raise await self._auth_refused(item, address)

    async def auth_failed(self, address: str) -> None:
        """Count a failed authentication; 429 (instead of 401) once over the limit."""
        item = _per_minute(self.settings.auth_failures_per_minute)
        if not await _hit(self.requests, item, 1, "auth", address):
            raise await self._auth_refused(item, address)

    async def _auth_refused(self, item: RateLimitItem, address: str) -> TooManyRequests:
        window = await _window(self.requests, item, "auth", address)
        return self._refused(
            "auth_failures",
            f"Too many failed authentications from this address (limit {item.amount} a "
            f"minute). Please try again in {duration(window.reset_s)}.",
            window.reset_s,
        )

    def _refused(
        self,
        limit: Limit,
        message: str,
        retry_after: float,
        headers: dict[str, str] | None = None,
    ) -> TooManyRequests:
        if self.metrics is not None:
            self.metrics.rate_limited.labels(limit).inc()
        return TooManyRequests(
            message, retry_after=math.ceil(retry_after), extra_headers=headers or {}
        )


class ReleasingStream(StreamingResponse):
    """A streamed answer that calls `release` once, whichever way it ends: its body
    runs out or fails, the client leaves (even before the first byte), or the response
    is dropped without ever being sent (when it is collected)."""

    def __init__(
        self, content: AsyncIterator[bytes], release: Callable[[], None], **kwargs: Any
    ) -> None:
        # A finalizer runs its function at most once, called or collected.
        self._release = weakref.finalize(self, release)
        super().__init__(_releasing(content, self._release), **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _releasing(
    chunks: AsyncIterator[bytes], release: Callable[[], object]
) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        release()


def _per_minute(amount: int) -> RateLimitItem:
    return RateLimitItemPerMinute(amount, namespace=_NAMESPACE)


async def _hit(limiter: RateLimiter, item: RateLimitItem, cost: int, *ids: str) -> bool:
    try:
        return await limiter.hit(item, *ids, cost=cost)
    except StorageError as exc:
        log.warning("rate-limit storage unavailable, not counting: %s", exc)
        return True


async def _window(limiter: RateLimiter, item: RateLimitItem, *ids: str) -> Window:
    try:
        stats = await limiter.get_window_stats(item, *ids)
    except StorageError:
        return Window(item.amount, item.amount, 0.0)
    return Window(item.amount, stats.remaining, max(0.0, stats.reset_time - time.time()))
