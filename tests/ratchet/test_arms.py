"""The canary's split: the share holds within its statistical tolerance, one voter
always gets one arm, and a new canary draws a new sample of voters."""

import math
import uuid

import pytest

from ratchet.arms import arm_for, bucket

KEYS = [uuid.UUID(int=k * 7919 + 1) for k in range(4)]
VOTERS = [(key, f"user-{u}") for key in KEYS for u in range(5000)]  # 20,000 voters


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5])
def test_the_share_of_voters_on_the_canary_is_within_tolerance(share: float) -> None:
    n = len(VOTERS)
    on = sum(arm_for(k, u, share, salt="canary-1") == "canary" for k, u in VOTERS)
    sd = math.sqrt(n * share * (1 - share))
    assert abs(on - n * share) < 4 * sd, (on, n * share)  # 4 sd: 1 in 15,000 by chance


def test_one_voter_always_gets_one_arm_and_salts_draw_new_samples() -> None:
    first = [arm_for(k, u, 0.1, salt="canary-1") for k, u in VOTERS[:2000]]
    again = [arm_for(k, u, 0.1, salt="canary-1") for k, u in VOTERS[:2000]]
    assert first == again
    other = [arm_for(k, u, 0.1, salt="canary-2") for k, u in VOTERS[:2000]]
    both = sum(a == b == "canary" for a, b in zip(first, other, strict=True))
    # Independent draws overlap on about 1% (0.1 * 0.1) of voters; the same draw on 10%.
    assert both < 0.03 * len(first)
    # The same end user under two keys is two voters, with their own draws.
    assert len({bucket(k, "alice", "s") for k in KEYS}) == len(KEYS)
    assert bucket(None, "alice", "s") != bucket(KEYS[0], "alice", "s")


def test_a_larger_share_keeps_everyone_already_on_the_canary() -> None:
    small = {v for v in VOTERS if arm_for(*v, 0.05, salt="s") == "canary"}
    large = {v for v in VOTERS if arm_for(*v, 0.2, salt="s") == "canary"}
    assert small < large  # raising the share adds people; nobody switches back
    assert arm_for(KEYS[0], "x", 0.0, "s") == "control" and arm_for(KEYS[0], "x", 1.0, "s") == (
        "canary"
    )
    with pytest.raises(ValueError, match="share"):
        arm_for(KEYS[0], "x", 1.5, "s")
