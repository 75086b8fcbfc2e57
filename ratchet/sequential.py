"""Intervals for live evidence that stay valid however often they are looked at.

Live votes arrive one at a time, and the canary's page is read whenever someone
likes. A fixed-sample interval re-checked after every vote claims a difference far
more often than its nominal 5% when there is none (`tests/ratchet/test_sequential.py`
measures it). These are confidence sequences instead: with probability at least
1 - alpha, the interval holds after every vote at once, so a decision may be read at
any time, and stopping as soon as one appears is allowed.

Method: Robbins' normal mixture (Howard, Ramdas, McAuliffe and Sekhon, "Time-uniform,
nonparametric, nonasymptotic confidence sequences", Annals of Statistics, 2021).
Every vote is a number in [0, 1] (a thumb: 1 up, 0 down; a battle: 1 won, 0.5 tie,
0 lost), so the centred sum S_t of t votes is sub-Gaussian with variance proxy
V_t = t/4 (Hoeffding's lemma). Mixing the supermartingales exp(l*S_t - l^2*V_t/2)
over l ~ N(0, 1/rho) and applying Ville's inequality gives

    P(for some t: |S_t| >= sqrt((V_t + rho) * ln((V_t + rho) / (rho * alpha^2)))) <= alpha,

so after t votes the mean lies within that radius divided by t, at every t at once.
For two arms, each arm gets its own sequence at alpha/2 (a union bound), and the
difference's interval runs from one arm's low end minus the other's high end.

The price of validity at every look is width: the radius grows like sqrt(ln t / t)
rather than 1/sqrt(t). The bound needs no more than bounded votes with a fixed mean
per arm; it is conservative for thumbs, whose variance is below 1/4 unless the rate is
near 50%.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

Verdict = Literal["better", "worse", "not yet"]
ALPHA = 0.05
# rho sets where the radius is tightest; Howard et al.'s rule for a target of
# TUNED_FOR votes. Canaries at a few percent of traffic gather hundreds of votes.
TUNED_FOR = 500
_MAX_VOTES = 10**9  # beyond this a decision is not "still to come"


def mixture_rho(votes: int = TUNED_FOR, alpha: float = ALPHA) -> float:
    """The mixing precision that makes the radius near its smallest at `votes`."""
    log_term = -2 * math.log(alpha) + math.log(1 - 2 * math.log(alpha))
    return votes / 4 / log_term


def radii(
    votes: npt.ArrayLike, alpha: float = ALPHA, rho: float | None = None
) -> npt.NDArray[np.float64]:
    """Half-width of the mean's interval after each number of votes in [0, 1] (inf
    at 0), elementwise: for simulations and for both arms at once."""
    rho = mixture_rho(alpha=alpha) if rho is None else rho
    n = np.asarray(votes, dtype=float)
    v = n / 4 + rho
    with np.errstate(divide="ignore"):
        r = np.sqrt(v * np.log(v / (rho * alpha**2))) / n
    return np.where(n > 0, r, np.inf)


def radius(votes: float, alpha: float = ALPHA, rho: float | None = None) -> float:
    """Half-width of the mean's interval after `votes` votes in [0, 1]: `radii` for
    one count, in plain floats (the votes-needed search calls it dozens of times)."""
    if votes <= 0:
        return math.inf
    rho = mixture_rho(alpha=alpha) if rho is None else rho
    v = votes / 4 + rho
    return math.sqrt(v * math.log(v / (rho * alpha**2))) / votes


@dataclass(frozen=True)
class Evidence:
    """A live comparison: the estimate, its always-valid interval and what it says.

    `estimate` is the candidate's win rate (battles) or its rate minus the control's
    (canary arms). `votes_needed`: more votes after which the present effect, if it
    stays, would decide; 0 once decided, None with no effect to detect."""

    verdict: Verdict
    estimate: float
    low: float
    high: float
    votes: int
    votes_needed: int | None
    null: float
    alpha: float


def win_rate(score: float, battles: int, alpha: float = ALPHA) -> Evidence:
    """The candidate's win rate over `battles` blind battles, `score` being its wins
    plus half its ties: better or worse than an even 0.5."""
    if not 0 <= score <= battles:
        raise ValueError(f"a score of {score} is impossible in {battles} battles")
    estimate = score / battles if battles else 0.5
    r = radius(battles, alpha)
    low, high = max(0.0, estimate - r), min(1.0, estimate + r)
    verdict = _verdict(low, high, 0.5)
    effect = abs(estimate - 0.5)
    needed = 0 if verdict != "not yet" else _needed(battles, effect, lambda n: radius(n, alpha))
    return Evidence(verdict, estimate, low, high, battles, needed, 0.5, alpha)


def rate_difference(
    hits: int, votes: int, control_hits: int, control_votes: int, alpha: float = ALPHA
) -> Evidence:
    """A canary arm's rate (thumbs up over votes) minus the control arm's: better when
    the canary's is higher at every look, worse when lower."""
    for h, n in ((hits, votes), (control_hits, control_votes)):
        if not 0 <= h <= n:
            raise ValueError(f"{h} hits out of {n} votes is impossible")
    low, high = map(float, difference_intervals(hits, votes, control_hits, control_votes, alpha))
    rate = hits / votes if votes else 0.0
    control = control_hits / control_votes if control_votes else 0.0
    estimate = rate - control if votes and control_votes else 0.0
    verdict = _verdict(low, high, 0.0)
    share = votes / (votes + control_votes) if votes and control_votes else 0.5
    total = votes + control_votes

    def width(n: int) -> float:
        return radius(n * share, alpha / 2) + radius(n * (1 - share), alpha / 2)

    needed = 0 if verdict != "not yet" else _needed(total, abs(estimate), width)
    return Evidence(verdict, estimate, low, high, total, needed, 0.0, alpha)


def difference_intervals(
    hits: npt.ArrayLike,
    votes: npt.ArrayLike,
    control_hits: npt.ArrayLike,
    control_votes: npt.ArrayLike,
    alpha: float = ALPHA,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The always-valid interval of rate - control rate, elementwise."""
    a_low, a_high = _arm(hits, votes, alpha / 2)
    b_low, b_high = _arm(control_hits, control_votes, alpha / 2)
    return a_low - b_high, a_high - b_low


def _arm(
    hits: npt.ArrayLike, votes: npt.ArrayLike, alpha: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    n = np.asarray(votes, dtype=float)
    mean = np.asarray(hits, dtype=float) / np.where(n > 0, n, 1)  # an empty arm: any rate
    r = radii(n, alpha)
    return np.clip(mean - r, 0.0, 1.0), np.clip(mean + r, 0.0, 1.0)


def _verdict(low: float, high: float, null: float) -> Verdict:
    if low > null:
        return "better"
    if high < null:
        return "worse"
    return "not yet"


def _needed(now: int, effect: float, width: Callable[[int], float]) -> int | None:
    """Votes to add until the interval's half-width (or width, for two arms) falls
    below the effect: the smallest such total, by doubling then bisection (the
    radius falls steadily with the votes)."""
    if effect <= 0:
        return None
    high = max(now, 1)
    while width(high) >= effect:
        if high >= _MAX_VOTES:
            return None
        high *= 2
    low = max(now, 1)
    while low < high:
        mid = (low + high) // 2
        if width(mid) < effect:
            high = mid
        else:
            low = mid + 1
    return max(0, high - now)
