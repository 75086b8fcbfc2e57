"""Errors of the feedback stage.

FeedbackError
 ├── UnknownCompletion   a vote names a completion that was never logged
 ├── UnknownComparison   a choice names a comparison that does not exist
 └── AlreadyDecided      a comparison already has a different choice
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
