"""The live part of the gate: what a canary's thumbs and blind battles say about a
candidate, against the policy's `live` thresholds.

Two kinds of evidence, each an always-valid interval (`ratchet.sequential`), so the
decision may be read after every vote:
- battles: the candidate's win rate must be above `min_win_rate` (superiority);
- canary thumbs: users must like the canary better (its thumbs-down rate
  significantly below the control arm's), and it fails when its thumbs-down rate rose
  by more than `max_thumbs_down_increase`: the harm tolerated before a rollback.

The candidate is `better` once every kind of evidence present passes and there are
`min_votes` votes in all; `worse` as soon as one kind fails (however few votes: an
always-valid interval that excludes the margin is evidence at any count); otherwise
`not yet`. Each kind is tested at alpha / (kinds present), so the two together keep
the false-decision rate at alpha.
"""

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from ratchet.sequential import ALPHA, Evidence, Verdict, rate_difference, win_rate


class LivePolicy(BaseModel):
    """`live:` in the gate policy."""

    model_config = ConfigDict(extra="forbid")

    # Whether a candidate that passed the offline gate must also win live evidence
    # (gate -> canary -> promoted) before it is promoted.
    required: bool = False
    min_votes: int = Field(default=200, ge=1)
    min_win_rate: float = Field(default=0.5, ge=0, le=1)
    max_thumbs_down_increase: float = Field(default=0.02, ge=0, le=1)
    alpha: float = Field(default=ALPHA, gt=0, lt=0.5)


@dataclass(frozen=True)
class Thumbs:
    """A canary's votes per arm: thumbs up, and votes in all."""

    canary_up: int
    canary_votes: int
    control_up: int
    control_votes: int


@dataclass(frozen=True)
class LiveDecision:
    verdict: Verdict
    reasons: list[str]
    votes: int
    battles: Evidence | None
    thumbs: Evidence | None


def decide(
    policy: LivePolicy, thumbs: Thumbs | None = None, battle_score: tuple[float, int] | None = None
) -> LiveDecision:
    """`battle_score`: the candidate's (wins + ties / 2, battles)."""
    kinds = (thumbs is not None) + (battle_score is not None)
    alpha = policy.alpha / max(kinds, 1)
    fought = win_rate(*battle_score, alpha=alpha) if battle_score else None
    split = (
        rate_difference(
            thumbs.canary_up, thumbs.canary_votes, thumbs.control_up, thumbs.control_votes, alpha
        )
        if thumbs
        else None
    )
    verdicts: list[tuple[Verdict, str]] = []
    if fought is not None:
        verdicts.append(_battles(fought, policy.min_win_rate))
    if split is not None:
        verdicts.append(_thumbs(split, policy.max_thumbs_down_increase))
    votes = (fought.votes if fought else 0) + (split.votes if split else 0)
    reasons = [why for _, why in verdicts] or ["no live votes yet"]
    if any(v == "worse" for v, _ in verdicts):
        verdict: Verdict = "worse"
    elif verdicts and all(v == "better" for v, _ in verdicts) and votes >= policy.min_votes:
        verdict = "better"
    else:
        verdict = "not yet"
        if votes < policy.min_votes:
            reasons.append(f"{votes} live votes of the {policy.min_votes} the policy asks")
    return LiveDecision(verdict, reasons, votes, fought, split)


def _battles(e: Evidence, floor: float) -> tuple[Verdict, str]:
    span = f"win rate {e.estimate:.1%} (interval {e.low:.1%}..{e.high:.1%}, {e.votes} battles)"
    if e.low > floor:
        return "better", f"battles: {span} is above {floor:.0%}"
    if e.high < floor:
        return "worse", f"battles: {span} is below {floor:.0%}"
    return "not yet", f"battles: {span} does not yet exclude {floor:.0%}"


def _thumbs(e: Evidence, margin: float) -> tuple[Verdict, str]:
    """Better only when users like the canary more (its up-rate's interval above the
    control's); worse when its thumbs-down rate rose by more than the margin. A canary
    merely no worse stays `not yet`: no preference is no evidence for a change."""
    # e is the up-rate difference (canary - control); a thumbs-down rise is its negative.
    rise, low, high = -e.estimate, -e.high, -e.low
    span = f"thumbs-down {rise:+.1%} against control (interval {low:+.1%}..{high:+.1%})"
    if high < 0:
        return "better", f"canary: {span}: users like it better"
    if low > margin:
        return "worse", f"canary: {span} is above +{margin:.1%}"
    return "not yet", f"canary: {span} shows neither a gain nor a rise past +{margin:.1%}"
