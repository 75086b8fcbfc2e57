"""The live decision on simulated voters: voters with no preference leave it at `not
yet` however often it is read; voters with a taste make it `better` or `worse`."""

import numpy as np
import pytest
from pydantic import ValidationError

from ratchet.live import LivePolicy, Thumbs, decide

POLICY = LivePolicy(min_votes=200, max_thumbs_down_increase=0.02)


def simulate(
    rng: np.random.Generator, votes: int, win: float, canary_up: float, control_up: float
) -> tuple[np.ndarray, ...]:
    """Cumulative evidence after each vote: battle score, and thumbs per arm (20% of
    the thumbs go to the canary). Half the votes are battles (a fifth of them ties)."""
    battle = rng.random(votes) < 0.5
    tie = rng.random(votes) < 0.2
    won = np.where(tie, 0.5, (rng.random(votes) < win).astype(float))
    canary = rng.random(votes) < 0.2
    up = rng.random(votes) < np.where(canary, canary_up, control_up)
    thumb = ~battle
    return (
        np.cumsum(np.where(battle, won, 0.0)),
        np.cumsum(battle),
        np.cumsum(thumb & canary & up),
        np.cumsum(thumb & canary),
        np.cumsum(thumb & ~canary & up),
        np.cumsum(thumb & ~canary),
    )


def verdicts(rng: np.random.Generator, votes: int, every: int, **taste: float) -> list[str]:
    """The decision read every `every` votes, up to the first that is not `not yet`."""
    score, battles, c_up, c_n, k_up, k_n = simulate(rng, votes, **taste)
    seen: list[str] = []
    for i in range(every - 1, votes, every):
        thumbs = Thumbs(int(c_up[i]), int(c_n[i]), int(k_up[i]), int(k_n[i]))
        verdict = decide(POLICY, thumbs, (float(score[i]), int(battles[i]))).verdict
        seen.append(verdict)
        if verdict != "not yet":
            break
    return seen


def test_voters_without_a_preference_decide_nothing_however_often_it_is_read() -> None:
    rng = np.random.default_rng(5)
    runs = [verdicts(rng, 2000, 20, win=0.5, canary_up=0.6, control_up=0.6) for _ in range(150)]
    decided = [run[-1] for run in runs if run[-1] != "not yet"]
    assert len(decided) / len(runs) <= POLICY.alpha, decided  # ever, in any run
    # A canary merely no worse than control is no evidence for a change either.
    (_, _, c_up, c_n, k_up, k_n) = simulate(rng, 20_000, win=0.5, canary_up=0.6, control_up=0.6)
    reads = [
        Thumbs(int(c_up[i]), int(c_n[i]), int(k_up[i]), int(k_n[i])) for i in range(99, 20_000, 100)
    ]
    tolerant = LivePolicy(max_thumbs_down_increase=0.1)  # its intervals get inside +10%
    assert {decide(tolerant, t).verdict for t in reads} == {"not yet"}


def test_a_candidate_users_prefer_becomes_better() -> None:
    rng = np.random.default_rng(6)
    runs = [verdicts(rng, 4000, 50, win=0.7, canary_up=0.8, control_up=0.6) for _ in range(20)]
    assert all(run[-1] == "better" for run in runs), [run[-1] for run in runs]
    needed = max(len(run) * 50 for run in runs)
    assert needed <= 4000


def test_a_harmful_candidate_becomes_worse_within_a_bounded_number_of_votes() -> None:
    rng = np.random.default_rng(7)
    runs = [verdicts(rng, 3000, 25, win=0.3, canary_up=0.4, control_up=0.65) for _ in range(20)]
    assert all(run[-1] == "worse" for run in runs), [run[-1] for run in runs]
    assert max(len(run) * 25 for run in runs) <= 1500


def test_strong_evidence_waits_for_the_policys_votes_and_reasons_say_why() -> None:
    early = decide(POLICY, None, (60.0, 60))  # 60 battles won of 60
    assert early.battles is not None and early.battles.verdict == "better"
    assert early.verdict == "not yet"
    assert early.reasons[-1] == "60 live votes of the 200 the policy asks"
    enough = decide(POLICY, None, (200.0, 200))
    assert enough.verdict == "better" and enough.reasons[0].startswith("battles: win rate")
    nothing = decide(POLICY)
    assert nothing.verdict == "not yet" and nothing.reasons[0] == "no live votes yet"


def test_one_failing_kind_of_evidence_is_enough_for_worse() -> None:
    thumbs = Thumbs(canary_up=20, canary_votes=100, control_up=300, control_votes=400)
    both = decide(POLICY, thumbs, (150.0, 200))  # battles fine, thumbs far worse
    assert both.verdict == "worse"
    assert any(r.startswith("canary: thumbs-down +55.0%") for r in both.reasons), both.reasons
    liked = decide(POLICY, Thumbs(90, 100, 240, 400), (140.0, 200))  # 90% up against 60%
    assert liked.verdict == "better" and "users like it better" in liked.reasons[1]


def test_the_policy_refuses_unknown_or_impossible_settings() -> None:
    with pytest.raises(ValidationError):
        LivePolicy.model_validate({"min_vote": 10})
    with pytest.raises(ValidationError):
        LivePolicy(min_win_rate=1.5)
