"""Which arm of a canary a person sees: the same one on every request.

A canary answers a share of `production`'s traffic from the candidate. The split is by
person, not by request: one (key, end user) always gets one arm, so nobody sees two
models take turns, and their votes attach to one arm. The arm is a hash of the voter
and of the canary's own salt, so a new canary draws a new sample of people rather than
putting the same unlucky ones on every candidate. One hash and a comparison: no lookup
on the request path.
"""

import hashlib
import uuid
from typing import Literal

Arm = Literal["control", "canary"]
_SCALE = float(2**64)


def bucket(key_id: uuid.UUID | None, end_user: str, salt: str) -> float:
    """A number in [0, 1) fixed for this voter and salt, spread evenly over them."""
    digest = hashlib.blake2b(
        f"{key_id or ''}\x00{end_user}".encode(), digest_size=8, key=salt.encode()[:64]
    ).digest()
    return int.from_bytes(digest, "big") / _SCALE


def arm_for(key_id: uuid.UUID | None, end_user: str, share: float, salt: str) -> Arm:
    """The canary for the first `share` of the voters' buckets, control for the rest."""
    if not 0 <= share <= 1:
        raise ValueError(f"a canary share of {share} is not a fraction of traffic")
    return "canary" if bucket(key_id, end_user, salt) < share else "control"
