"""Looking at one greedy answer: its flags, and how it differs from another."""

import difflib
import re
from collections import Counter
from typing import Literal

from ratchet.report import Flag

REFUSALS = re.compile(
    r"\b(i can(?:'|no)t (?:help|assist|provide|do that|answer)|i cannot\b|i'm sorry, but"
    r"|i am sorry, but|as an ai\b|i'm not able to|i am unable to|i won't be able to)",
    re.IGNORECASE,
)
# An n-gram of words seen this often in one answer is a loop, not style.
_LOOP_N, _LOOP_TIMES = 5, 3


def flags(text: str, finish_reason: str | None) -> list[Flag]:
    found: list[Flag] = []
    if not text.strip():
        found.append("empty")
    if finish_reason == "length":
        found.append("hit_max_tokens")
    if is_loop(text):
        found.append("repetition")
    if REFUSALS.search(text):
        found.append("refusal")
    return found


def is_loop(text: str) -> bool:
    """True when some run of words recurs, or the tail repeats one short chunk."""
    words = text.lower().split()
    grams = Counter(tuple(words[i : i + _LOOP_N]) for i in range(len(words) - _LOOP_N + 1))
    if grams and max(grams.values()) >= _LOOP_TIMES:
        return True
    tail = text.rstrip()
    # A chunk of 1-40 characters repeated to fill the last 30+ characters ("!!!!", "a b a b").
    for period in range(1, 41):
        span = max(30, 3 * period)
        if len(tail) >= span and tail[-span:] == (tail[-period:] * (span // period + 1))[-span:]:
            return True
    return False


def char_diff(old: str, new: str) -> list[tuple[Literal["=", "-", "+"], str]]:
    """Character-level edit script from `old` to `new`, with runs merged."""
    ops: list[tuple[Literal["=", "-", "+"], str]] = []
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            ops.append(("=", old[i1:i2]))
        else:
            if i2 > i1:
                ops.append(("-", old[i1:i2]))
            if j2 > j1:
                ops.append(("+", new[j1:j2]))
    return ops


def length_ratio(production: str, candidate: str) -> float:
    return (len(candidate) + 1) / (len(production) + 1)
