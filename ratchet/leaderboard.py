"""Ratings from blind battles: a Bradley-Terry fit with bootstrap 95% intervals.

The method is Chatbot Arena's (FastChat's `fastchat/serve/monitor/elo_analysis.py`):
the probability that model i beats model j is 1 / (1 + 10^((R_j - R_i) / 400)), and
the ratings R maximise the likelihood of the battles seen. A tie, whether both answers
were good or both bad, counts as half a win and half a loss. The ratings are on the
Elo scale (400 points: 10 to 1 odds) with the base model anchored at 1000, so a
number means the same from one day to the next. The intervals come from refitting
on battles resampled with replacement (a multinomial over the distinct outcomes, as
FastChat does), 2.5th to 97.5th percentile.

Pure: which battles count (blind ones, from voters within their caps) is the
caller's choice.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize
from scipy.special import expit

Outcome = Literal["a", "b", "tie", "both_bad"]
SCALE = 400.0
BASE = 10.0
ANCHOR_RATING = 1000.0
_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}


@dataclass(frozen=True)
class Battle:
    a: str
    b: str
    outcome: Outcome


@dataclass(frozen=True)
class Rating:
    model: str
    rating: float
    low: float
    high: float
    battles: int


@dataclass(frozen=True)
class _Table:
    """The distinct (a, b, score) outcomes and how often each was seen."""

    models: list[str]
    pairs: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float64]
    counts: npt.NDArray[np.float64]


def fit(battles: Sequence[Battle], anchor: str = "base") -> dict[str, float]:
    """Each model's rating (Elo scale; `anchor`, if it fought, at 1000)."""
    table = _table(battles)
    return dict(zip(table.models, _ratings(table, table.counts, anchor), strict=True))


def leaderboard(
    battles: Sequence[Battle], anchor: str = "base", rounds: int = 1000, seed: int = 0
) -> list[Rating]:
    """Every model that fought, best first, with its bootstrap 95% interval."""
    table = _table(battles)
    if not table.models:
        return []
    point = _ratings(table, table.counts, anchor)
    rng = np.random.default_rng(seed)
    total = int(table.counts.sum())
    draws = rng.multinomial(total, table.counts / total, size=rounds).astype(float)
    samples = np.array([_ratings(table, weights, anchor) for weights in draws])
    low, high = np.percentile(samples, [2.5, 97.5], axis=0)
    fought = np.zeros(len(table.models))
    np.add.at(fought, table.pairs[:, 0], table.counts)
    np.add.at(fought, table.pairs[:, 1], table.counts)
    rows = [
        Rating(model, float(point[i]), float(low[i]), float(high[i]), int(fought[i]))
        for i, model in enumerate(table.models)
    ]
    return sorted(rows, key=lambda r: (-r.rating, r.model))


def _table(battles: Sequence[Battle]) -> _Table:
    models = sorted({m for b in battles for m in (b.a, b.b)})
    index = {m: i for i, m in enumerate(models)}
    seen: dict[tuple[int, int, float], int] = {}
    for battle in battles:
        if battle.a == battle.b:
            raise ValueError(f"a battle needs two models, not {battle.a!r} twice")
        key = (index[battle.a], index[battle.b], _SCORE[battle.outcome])
        seen[key] = seen.get(key, 0) + 1
    keys = list(seen)
    return _Table(
        models=models,
        pairs=np.array([(a, b) for a, b, _ in keys], dtype=np.int64).reshape(-1, 2),
        scores=np.array([s for _, _, s in keys], dtype=float),
        counts=np.array([seen[k] for k in keys], dtype=float),
    )


def _ratings(
    table: _Table, weights: npt.NDArray[np.float64], anchor: str
) -> npt.NDArray[np.float64]:
    step = math.log(BASE)

    def loss(r: npt.NDArray[np.float64]) -> tuple[float, npt.NDArray[np.float64]]:
        logits = step * (r[table.pairs[:, 0]] - r[table.pairs[:, 1]])
        p = np.clip(expit(logits), 1e-12, 1 - 1e-12)
        nll = -(weights * (table.scores * np.log(p) + (1 - table.scores) * np.log(1 - p))).sum()
        g = -step * (table.scores - p) * weights
        grad = np.zeros_like(r)
        np.add.at(grad, table.pairs[:, 0], g)
        np.add.at(grad, table.pairs[:, 1], -g)
        return float(nll), grad

    # As FastChat: L-BFGS from all-equal ratings, at most 100 iterations, which also
    # keeps a model that never lost (whose likelihood has no maximum) at a finite rating.
    start = np.zeros(len(table.models))
    found = minimize(loss, start, jac=True, method="L-BFGS-B",
                     options={"maxiter": 100, "gtol": 1e-8})  # fmt: skip
    ratings: npt.NDArray[np.float64] = SCALE * np.asarray(found.x, dtype=float)
    shift = ratings[table.models.index(anchor)] if anchor in table.models else ratings.mean()
    return ratings - float(shift) + ANCHOR_RATING
