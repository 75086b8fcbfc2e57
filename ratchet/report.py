"""The promotion report: what the gate measured, what it decided, and why.

One typed model, stored as JSON in `evaluations.report`, rendered as HTML, Markdown
or JSON. Everything a reviewer needs is in it, so a report reads the same later
even after the adapters or the policy have changed.
"""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Flag = Literal["empty", "hit_max_tokens", "repetition", "refusal"]
FLAGS: tuple[Flag, ...] = ("empty", "hit_max_tokens", "repetition", "refusal")


class ModelRef(BaseModel):
    """One side of the comparison: the base model, or an adapter on it."""

    label: str  # "base" or "ratchet-<sha16>"
    adapter_id: str | None = None
    sha256: str | None = None
    path: str | None = None


class BenchmarkScore(BaseModel):
    task: str
    n: int
    production: float
    candidate: float
    delta: float
    ci_low: float  # bootstrap CI of the paired difference, candidate - production
    ci_high: float
    production_ci: tuple[float, float]
    candidate_ci: tuple[float, float]
    p_value: float  # exact McNemar on the discordant items
    changed: int  # items one model got right and the other wrong
    # Whether the benchmark can tell anything here; see eval.gate.benchmark_score.
    # (Defaults: reports stored before these fields existed.)
    chance: float | None = None  # the accuracy of guessing, from each item's choices
    items_needed: int | None = None  # to detect the policy's max_regression at its power
    at_chance: bool = False  # production's accuracy interval includes `chance`
    informative: bool = True
    uninformative_because: list[str] = Field(default_factory=list)


class Preference(BaseModel):
    """Held-out pairs: how often each model ranks chosen above rejected."""

    n: int
    production: float  # production's log-prob ranking
    candidate: float  # the candidate's implicit reward (vs the base) ranking
    candidate_logprob: float  # the candidate's plain log-prob ranking, for reference
    delta: float
    ci_low: float
    ci_high: float
    candidate_ci: tuple[float, float]


class Answer(BaseModel):
    text: str
    finish_reason: str | None
    tokens: int
    flags: list[Flag] = Field(default_factory=list)


class DiffItem(BaseModel):
    """One prompt answered greedily by both models."""

    source: Literal["held_out", "regression"]
    prompt: str
    production: Answer
    candidate: Answer
    identical: bool
    length_ratio: float  # candidate chars / production chars
    # Character-level diff from production to candidate: (op, text), op in =,-,+.
    diff: list[tuple[Literal["=", "-", "+"], str]]


class FlagRate(BaseModel):
    production: float
    candidate: float


class DiffSummary(BaseModel):
    n: int
    identical: float
    mean_length_ratio: float
    flags: dict[str, FlagRate]


class JudgeResult(BaseModel):
    model: str
    n: int
    candidate_wins: int
    production_wins: int
    ties: int
    win_rate: float  # (wins + ties / 2) / n
    ci_low: float
    ci_high: float


class Criterion(BaseModel):
    name: str  # e.g. "benchmark:ratchet_arc_easy", "preference", "flag:repetition"
    passed: bool
    detail: str
    # False: the evidence cannot decide; it neither passes nor fails the candidate.
    informative: bool = True


class Decision(BaseModel):
    decision: Literal["pass", "fail"]
    reasons: list[str]  # why it failed; for a pass, the evidence that carried it
    criteria: list[Criterion]


class Review(BaseModel):
    status: Literal["pending", "approved", "rejected", "not_needed"]
    by: str | None = None
    at: datetime | None = None
    note: str | None = None


class Report(BaseModel):
    evaluation_id: int
    created_at: datetime
    candidate: ModelRef
    production: ModelRef
    base_model: str
    mode: Literal["review", "auto"]
    policy: dict[str, Any]
    decision: Decision
    benchmarks: list[BenchmarkScore]
    preference: Preference | None
    diff_summary: DiffSummary
    diffs: list[DiffItem]
    judge: JudgeResult | None = None
    training_card: dict[str, Any] | None = None
    training_curve: list[dict[str, float]] = Field(default_factory=list)
    timings_s: dict[str, float] = Field(default_factory=dict)
    review: Review = Field(default_factory=lambda: Review(status="pending"))
