"""Errors of the feedback stage.

FeedbackError
 ├── UnknownCompletion   a vote names a completion that was never logged
 ├── UnknownComparison   a choice names a comparison that does not exist
 ├── AlreadyDecided      a comparison already has a different choice
 ├── NotTheOwner         a vote or choice names an end user the answer was not for
 ├── VoteCapExceeded     a voter has cast its votes and choices for the day
 ├── VoterBusy           the voter's other votes hold its lock; retry in a moment
 ├── NotEnoughPairs      the votes yield too few pairs for a snapshot
 ├── UnknownSnapshot     no snapshot with this id
 ├── SnapshotCorrupted   a snapshot's files do not match their hashes
 └── StorageUnavailable  neither the database nor the spool can take a write now
"""

from ratchet.errors import RatchetError


class FeedbackError(RatchetError):
    """Base of the feedback stage's errors."""


class UnknownCompletion(FeedbackError):
    """No completion with this id was ever logged."""


class UnknownComparison(FeedbackError):
    """No comparison with this id exists."""


class AlreadyDecided(FeedbackError):
    """The comparison was already decided with another choice; the first one stands."""

    def __init__(self, comparison_id: str, choice: str) -> None:
        super().__init__(f"comparison {comparison_id} was already decided as {choice!r}")
        self.choice = choice


class NotTheOwner(FeedbackError):
    """The vote or choice names an end user other than the one the answer was for."""


class VoteCapExceeded(FeedbackError):
    """The voter cast `cap` votes and choices in the last 24 hours; retry after
    `retry_after` seconds, when the oldest of them leaves the window."""

    def __init__(self, cap: int, retry_after: int) -> None:
        super().__init__(f"this voter cast {cap} votes and choices in the last 24 hours")
        self.cap = cap
        self.retry_after = retry_after


class VoterBusy(FeedbackError):
    """Other votes of the same voter held its lock past the lock timeout: a flood of
    votes queues here, never on the pool (which would look like the database down)."""


class NotEnoughPairs(FeedbackError):
    """The votes yield fewer pairs than asked for; no snapshot was written."""

    def __init__(self, found: int, wanted: int, counts: dict[str, object]) -> None:
        super().__init__(
            f"only {found} preference pairs (need {wanted}); no snapshot written. counts: {counts}"
        )
        self.found = found
        self.wanted = wanted
        self.counts = counts


class UnknownSnapshot(FeedbackError):
    """No snapshot with this id exists."""


class SnapshotCorrupted(FeedbackError):
    """A snapshot's files are missing or do not match their recorded hashes."""


class StorageUnavailable(FeedbackError):
    """The database is down and the spool is full or disabled: nothing was written, and
    the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, code: str = "storage_unavailable", retry_after: int = 5):
        super().__init__(message)
        self.message = message
        self.code = code
        self.retry_after = retry_after
