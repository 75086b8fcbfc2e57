"""Errors of the training stage.

TrainerError
 ├── InvalidTrainConfig   overrides that cannot work (negative lr, unknown algorithm)
 ├── NotEnoughData        the snapshot has too few pairs to train on
 └── PreflightFailed      the adapter would not load in vLLM; it is not registered
"""

from ratchet.errors import RatchetError


class TrainerError(RatchetError):
    """Base of the training stage's errors."""


class InvalidTrainConfig(TrainerError):
    """The training settings cannot work; the message names the field."""


class NotEnoughData(TrainerError):
    """The snapshot has fewer training pairs than required."""


class PreflightFailed(TrainerError):
    """The adapter breaks a rule vLLM enforces; the message lists each problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("adapter failed preflight: " + "; ".join(problems))
        self.problems = problems
