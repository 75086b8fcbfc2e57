"""Group commit: requests that arrive while a write is in flight go together in the next.

A vote's transaction costs the gateway and Postgres far more than the vote itself
(round trips, BEGIN/COMMIT, a WAL flush). Under load, many clients vote at once: one
writer task takes every request queued meanwhile (up to `max_items` items) and writes
them in one transaction, so a commit serves many clients. A lone request is written at
once (it waits only for the writer task to be scheduled), so nothing waits for a
timer. Each request gets its own items' outcomes, in order.

When a group's write raises, its requests are written again one at a time, so that one
request's failure (a voter's lock held too long, say) never fails another's.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Outcome = TypeVar("Outcome")
Rules = TypeVar("Rules")


@dataclass
class _Request(Generic[Item, Outcome, Rules]):
    items: list[Item]
    rules: Rules
    done: asyncio.Future[list[Outcome]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def settle(self, outcomes: list[Outcome] | BaseException) -> None:
        if self.done.done():  # its client left (the future was cancelled)
            return
        if isinstance(outcomes, BaseException):
            self.done.set_exception(outcomes)
        else:
            self.done.set_result(outcomes)


class GroupCommit(Generic[Item, Outcome, Rules]):
    def __init__(
        self,
        write: Callable[[list[Item], Rules], Awaitable[list[Outcome]]],
        max_items: int = 500,
        writers: int = 1,
    ) -> None:
        self._write = write
        self.max_items = max_items
        self.writers = writers
        self._queue: list[_Request[Item, Outcome, Rules]] = []
        self._writing: set[asyncio.Task[None]] = set()
        self.groups = 0  # transactions written

    async def submit(self, items: list[Item], rules: Rules) -> list[Outcome]:
        """The outcomes of `items`, written with whatever else is queued meanwhile."""
        request: _Request[Item, Outcome, Rules] = _Request(items, rules)
        # Retrieved here, so that an error nobody awaits any more is not logged as lost.
        request.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.append(request)
        if len(self._writing) < self.writers:
            writer = asyncio.get_running_loop().create_task(self._drain(), name="group-commit")
            self._writing.add(writer)
            writer.add_done_callback(self._writing.discard)
        # Shielded: a client that leaves does not cancel the write it may share.
        return await asyncio.shield(request.done)

    async def aclose(self) -> None:
        """Wait for what is queued to be written."""
        if self._writing:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._writing)

    async def _drain(self) -> None:
        while self._queue:
            group = self._take()
            try:
                await self._write_group(group)
            except BaseException as exc:  # cancelled: nobody is left waiting silently
                for request in group + self._queue:
                    request.settle(exc)
                self._queue.clear()
                raise

    def _take(self) -> list[_Request[Item, Outcome, Rules]]:
        """The oldest requests, up to `max_items` items (at least one request), that
        share the first one's rules."""
        first = self._queue[0]
        group: list[_Request[Item, Outcome, Rules]] = []
        size = 0
        for request in self._queue:
            full = size + len(request.items) > self.max_items
            if group and (full or request.rules != first.rules):
                break
            group.append(request)
            size += len(request.items)
        del self._queue[: len(group)]
        return group

    async def _write_group(self, group: list[_Request[Item, Outcome, Rules]]) -> None:
        self.groups += 1
        items = [item for request in group for item in request.items]
        try:
            outcomes = await self._write(items, group[0].rules)
        except Exception as exc:
            if len(group) == 1:
                group[0].settle(exc)
                return
            log.info("a grouped write failed (%r); writing its requests one by one", exc)
            for request in group:
                await self._write_group([request])  # alone: settles its own error
            return
        start = 0
        for request in group:
            request.settle(outcomes[start : start + len(request.items)])
            start += len(request.items)
