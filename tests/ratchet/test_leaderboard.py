"""The Bradley-Terry leaderboard against a reference fit, and its intervals."""

import math
import random

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from ratchet.leaderboard import Battle, fit, leaderboard

TRUE = {"base": 1000.0, "candidate": 1100.0, "old": 950.0}


def battles(n: int, seed: int, tie_share: float = 0.2) -> list[Battle]:
    """Battles between random pairs, won as the true ratings say, some tied."""
    rng = random.Random(seed)
    out: list[Battle] = []
    names = sorted(TRUE)
    for _ in range(n):
        a, b = rng.sample(names, 2)
        if rng.random() < tie_share:
            out.append(Battle(a, b, rng.choice(["tie", "both_bad"])))
            continue
        p = 1 / (1 + 10 ** ((TRUE[b] - TRUE[a]) / 400))
        out.append(Battle(a, b, "a" if rng.random() < p else "b"))
    return out


def reference(fought: list[Battle]) -> dict[str, float]:
    """FastChat's first published method: logistic regression on +-ln(10) columns,
    no intercept, no penalty; a tie is a win and a loss of half weight each."""
    names = sorted({m for b in fought for m in (b.a, b.b)})
    rows, labels, weights = [], [], []
    for battle in fought:
        x = np.zeros(len(names))
        x[names.index(battle.a)], x[names.index(battle.b)] = math.log(10), -math.log(10)
        if battle.outcome in ("tie", "both_bad"):
            rows += [x, x]
            labels += [1, 0]
            weights += [0.5, 0.5]
        else:
            rows.append(x)
            labels.append(1 if battle.outcome == "a" else 0)
            weights.append(1.0)
    model = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-10, max_iter=1000)
    model.fit(np.array(rows), np.array(labels), sample_weight=np.array(weights))
    ratings = 400 * model.coef_[0]
    ratings += 1000 - ratings[names.index("base")]
    return dict(zip(names, ratings.tolist(), strict=True))


def test_the_fit_matches_the_reference_computation() -> None:
    fought = battles(600, seed=7)
    ours, theirs = fit(fought), reference(fought)
    assert set(ours) == set(theirs) == set(TRUE)
    for name in TRUE:
        assert ours[name] == pytest.approx(theirs[name], abs=0.5), (ours, theirs)
    assert ours["base"] == 1000.0
    assert ours["candidate"] > ours["base"] > ours["old"]


def test_the_intervals_cover_the_truth_and_rank_the_best_first() -> None:
    board = leaderboard(battles(3000, seed=11, tie_share=0.0), rounds=300)  # pure BT
    assert [r.model for r in board] == ["candidate", "base", "old"]
    for row in board:
        assert row.low <= row.rating <= row.high
        assert row.low <= TRUE[row.model] <= row.high, row
    best, anchor = board[0], board[1]
    assert best.low > anchor.high - 1e-9 or best.low > 1000  # clearly better than the base
    assert sum(r.battles for r in board) == 2 * 3000


def test_ties_count_half_and_the_same_battles_give_the_same_board() -> None:
    even = [Battle("base", "twin", "tie")] * 10 + [Battle("twin", "base", "both_bad")] * 10
    assert fit(even)["twin"] == pytest.approx(1000.0, abs=1e-6)
    fought = battles(400, seed=3)
    assert leaderboard(fought, rounds=200, seed=1) == leaderboard(fought, rounds=200, seed=1)


def test_a_model_that_never_lost_stays_finite_and_nothing_is_empty() -> None:
    board = leaderboard([Battle("winner", "base", "a")] * 5, rounds=50)
    assert board[0].model == "winner" and math.isfinite(board[0].rating)
    assert leaderboard([]) == []
    with pytest.raises(ValueError, match="two models"):
        fit([Battle("base", "base", "a")])
