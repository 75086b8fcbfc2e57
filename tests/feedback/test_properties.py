"""Properties of the builder on random vote histories (hypothesis, real Postgres)."""

from pathlib import Path
from typing import Any

import psycopg
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from feedback.errors import NotEnoughPairs
from feedback.pairs.build import build
from ratchet.config import PairSettings
from tests.feedback import factories as f
from tests.feedback.conftest import empty

TEXTS = ["Paris" + f.LONG, "paris " + f.LONG.upper(), "Lyon" + f.LONG, "No idea" + f.LONG, "x"]
history = st.fixed_dictionaries(
    {
        "answers": st.lists(
            st.tuples(st.integers(0, 2), st.sampled_from(TEXTS), st.integers(1, 40)),
            min_size=2,
            max_size=12,
        ),
        "votes": st.lists(
            st.tuples(
                st.integers(0, 11),
                st.sampled_from(["u1", "u2", "u3"]),
                st.sampled_from([1, -1]),
                st.one_of(st.none(), st.sampled_from(TEXTS)),
            ),
            min_size=2,
            max_size=30,
        ),
        "choices": st.lists(
            st.tuples(
                st.integers(0, 11),
                st.integers(0, 11),
                st.sampled_from(["a", "b", "tie", "both_bad"]),
            ),
            max_size=6,
        ),
        "k": st.integers(1, 4),
    }
)


def load(url: str, h: dict[str, Any]) -> None:
    empty(url)
    with psycopg.connect(url, autocommit=True) as conn:
        ids = [
            f.answer(conn, f"question {p}", text, tokens=tokens) for p, text, tokens in h["answers"]
        ]
        seen = set()
        for i, user, rating, correction in h["votes"]:
            i %= len(ids)
            if (i, user) not in seen:  # one vote per user and answer
                seen.add((i, user))
                f.vote(conn, ids[i], rating, user, correction)
        for a, b, choice in h["choices"]:
            a, b = a % len(ids), b % len(ids)
            if a != b:
                f.comparison(conn, ids[a], ids[b], choice)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(h=history)
def test_builder_properties(h: dict[str, Any], pairs_url: str, tmp_path: Path) -> None:
    load(pairs_url, h)
    config = PairSettings(pairs_per_prompt=h["k"], held_out_fraction=0.5, min_answer_tokens=5)
    try:
        first = build(pairs_url, config, tmp_path / "a")
    except NotEnoughPairs:
        event("no pairs")
        return
    event("built")
    second = build(pairs_url, config, tmp_path / "b")
    assert first.content_sha256 == second.content_sha256  # deterministic
    with psycopg.connect(pairs_url, row_factory=psycopg.rows.dict_row) as conn:
        pairs = conn.execute("SELECT * FROM pairs WHERE snapshot_id = %s", (first.id,)).fetchall()
        linked = conn.execute(
            "SELECT pair_id, count(*) FILTER (WHERE cardinality(vote_ids) > 0"
            " OR comparison_id IS NOT"
            " NULL) AS n FROM pair_sources WHERE snapshot_id = %s GROUP BY pair_id",
            (first.id,),
        ).fetchall()
        kto = conn.execute(
            "SELECT split, prompt_sha256 FROM kto_rows WHERE snapshot_id = %s", (first.id,)
        ).fetchall()
    norm = [
        (
            p["prompt_sha256"],
            " ".join(p["chosen"].lower().split()),
            " ".join(p["rejected"].lower().split()),
        )
        for p in pairs
    ]
    assert all(c != r for _, c, r in norm)  # chosen never equals rejected
    assert len(set(norm)) == len(norm)  # no duplicates
    train = {p["prompt_sha256"] for p in pairs + kto if p["split"] == "train"}
    test = {p["prompt_sha256"] for p in pairs + kto if p["split"] == "test"}
    assert not train & test  # no held-out prompt in train
    counts = {row["pair_id"]: row["n"] for row in linked}
    assert {p["id"] for p in pairs} == set(counts) and min(counts.values()) >= 1
    thumbs_per_prompt: dict[str, int] = {}
    for p in pairs:
        if p["rule"] == "thumbs":
            thumbs_per_prompt[p["prompt_sha256"]] = thumbs_per_prompt.get(p["prompt_sha256"], 0) + 1
    assert all(n <= h["k"] for n in thumbs_per_prompt.values())
