"""The live-evidence intervals: valid under peeking after every vote, and able to decide.

Simulated voters, many runs: with no difference between the arms, the share of runs
that ever reach a decision while being looked at after every vote must stay within
alpha. A fixed-sample interval looked at the same way fails that, which shows the
check can fail.
"""

import numpy as np
import pytest

from ratchet import sequential
from ratchet.sequential import ALPHA, difference_intervals, radii, rate_difference, win_rate

RUNS = 400
VOTES = 3000


def canary_runs(
    rng: np.random.Generator, canary_rate: float, control_rate: float, share: float
) -> tuple[np.ndarray, ...]:
    """Cumulative hits and votes per arm after each vote, for RUNS runs: each vote
    goes to the canary with probability `share` (its traffic), and is a thumb up with
    its arm's rate."""
    canary = rng.random((RUNS, VOTES)) < share
    rate = np.where(canary, canary_rate, control_rate)
    up = rng.random((RUNS, VOTES)) < rate
    return (
        np.cumsum(up & canary, axis=1),
        np.cumsum(canary, axis=1),
        np.cumsum(up & ~canary, axis=1),
        np.cumsum(~canary, axis=1),
    )


def test_no_difference_rarely_decides_however_often_it_is_looked_at() -> None:
    rng = np.random.default_rng(1)
    hits, votes, control_hits, control_votes = canary_runs(rng, 0.7, 0.7, share=0.2)
    low, high = difference_intervals(hits, votes, control_hits, control_votes)
    decided = ((low > 0) | (high < 0)).any(axis=1)
    assert decided.mean() <= ALPHA, decided.mean()

    # The same looks with a fixed-sample 95% (Wald) interval decide far more often.
    with np.errstate(divide="ignore", invalid="ignore"):
        p, q = hits / votes, control_hits / control_votes
        se = np.sqrt(p * (1 - p) / votes + q * (1 - q) / control_votes)
    looked = (votes >= 10) & (control_votes >= 10)
    naive = (looked & (np.abs(p - q) > 1.96 * se)).any(axis=1)
    assert naive.mean() > 3 * ALPHA, naive.mean()


def test_battles_between_equals_rarely_decide() -> None:
    rng = np.random.default_rng(2)
    outcome = rng.choice([1.0, 0.5, 0.0], p=[0.4, 0.2, 0.4], size=(RUNS, VOTES))
    score, battles = np.cumsum(outcome, axis=1), np.arange(1, VOTES + 1)
    r = radii(battles)
    mean = score / battles
    decided = ((mean - r > 0.5) | (mean + r < 0.5)).any(axis=1)
    assert decided.mean() <= ALPHA, decided.mean()
    # The scalar form agrees with the arrays at the end of every run.
    ends = [win_rate(float(s), VOTES).verdict != "not yet" for s in score[:50, -1]]
    assert ends == [bool(d) for d in (np.abs(mean[:50, -1] - 0.5) > r[-1])]


@pytest.mark.parametrize(("canary", "verdict"), [(0.8, "better"), (0.45, "worse")])
def test_a_real_difference_is_decided(canary: float, verdict: str) -> None:
    rng = np.random.default_rng(3)
    hits, votes, control_hits, control_votes = canary_runs(rng, canary, 0.65, share=0.2)
    low, high = difference_intervals(hits, votes, control_hits, control_votes)
    right = (low > 0) if verdict == "better" else (high < 0)
    wrong = (high < 0) if verdict == "better" else (low > 0)
    assert right[:, -1].mean() > 0.95 and not wrong.any()
    run = 0
    final = rate_difference(
        int(hits[run, -1]), int(votes[run, -1]), int(control_hits[run, -1]),
        int(control_votes[run, -1]),
    )  # fmt: skip
    assert final.verdict == verdict and final.votes == VOTES and final.votes_needed == 0
    assert final.low <= canary - 0.65 <= final.high


def test_votes_needed_is_where_the_present_effect_would_decide() -> None:
    early = win_rate(55, 100)
    assert early.verdict == "not yet" and early.votes_needed is not None
    then = 100 + early.votes_needed
    assert win_rate(0.55 * then, then).verdict == "better"
    assert win_rate(0.55 * (then - 1), then - 1).verdict == "not yet"

    arms = rate_difference(70, 100, 600, 1000)  # canary 0.70 against 0.60, 10% traffic
    assert arms.verdict == "not yet" and arms.votes_needed is not None
    total = arms.votes + arms.votes_needed

    def at(n: int) -> str:  # the same rates and traffic split, n votes in all
        votes, control = round(n / 11), n - round(n / 11)
        return rate_difference(round(0.7 * votes), votes, round(0.6 * control), control).verdict

    # Whole votes round the rates a little: 2% either side of the figure.
    assert at(round(total * 1.02)) == "better" and at(round(total * 0.98)) == "not yet"


def test_no_votes_or_no_effect_decides_nothing() -> None:
    assert win_rate(0, 0).verdict == "not yet" and win_rate(0, 0).votes_needed is None
    even = win_rate(50, 100)
    assert even.verdict == "not yet" and even.votes_needed is None
    one_arm = rate_difference(0, 0, 8, 10)
    assert (one_arm.low, one_arm.high) == (-1.0, 1.0) and one_arm.verdict == "not yet"


def test_the_radius_shrinks_with_votes_and_is_tightest_near_its_tuning() -> None:
    widths = radii([10, 100, 1000, 10_000])
    assert np.all(np.diff(widths) < 0)
    rho = sequential.mixture_rho()
    at = sequential.TUNED_FOR
    assert sequential.radius(at, rho=rho) < min(
        sequential.radius(at, rho=rho * 4), sequential.radius(at, rho=rho / 4)
    )


@pytest.mark.parametrize("args", [(5, 4), (-1, 4)])
def test_impossible_counts_are_refused(args: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="impossible"):
        win_rate(*args)
    with pytest.raises(ValueError, match="impossible"):
        rate_difference(*args, 1, 2)
