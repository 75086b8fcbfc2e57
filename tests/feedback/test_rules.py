"""Each pair rule on hand-built votes, through the real builder on real Postgres."""

from pathlib import Path
from typing import Any

import psycopg
import pytest

from feedback.pairs.build import build
from feedback.prompts import prompt_messages, prompt_sha256
from ratchet.config import PairSettings
from tests.feedback import factories as f
from tests.feedback.factories import LONG


def run(url: str, tmp_path: Path, **settings: Any) -> tuple[list[dict[str, Any]], Any]:
    """Build a snapshot; return its pairs (with their sources) and the snapshot."""
    snapshot = build(url, PairSettings(**settings), tmp_path / "snapshots")
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        pairs = conn.execute(
            "SELECT p.*,"
            " (SELECT array_agg(DISTINCT v) FROM pair_sources s, unnest(s.vote_ids) AS v"
            "  WHERE s.snapshot_id = p.snapshot_id AND s.pair_id = p.id) AS votes,"
            " (SELECT array_agg(DISTINCT s.comparison_id) FROM pair_sources s"
            "  WHERE s.snapshot_id = p.snapshot_id AND s.pair_id = p.id"
            "  AND s.comparison_id IS NOT NULL) AS comparisons,"
            " (SELECT array_agg(DISTINCT s.completion_id) FROM pair_sources s"
            "  WHERE s.snapshot_id = p.snapshot_id AND s.pair_id = p.id) AS completions"
            " FROM pairs p WHERE p.snapshot_id = %s ORDER BY p.chosen, p.rejected",
            (snapshot.id,),
        ).fetchall()
    return pairs, snapshot


def kto(url: str, snapshot_id: int) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(
            "SELECT * FROM kto_rows WHERE snapshot_id = %s ORDER BY completion", (snapshot_id,)
        ).fetchall()


def test_choice_winner_is_chosen(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    a = f.answer(db, "Q", "A answer" + LONG)
    b = f.answer(db, "Q", "B answer" + LONG)
    cmp = f.comparison(db, a, b, "b")
    (pair,), _ = run(pairs_url, tmp_path)
    assert (pair["rule"], pair["chosen"], pair["rejected"]) == (
        "choice",
        "B answer" + LONG,
        "A answer" + LONG,
    )
    assert pair["comparisons"] == [cmp] and set(pair["completions"]) == {a, b}
    assert pair["prompt"] == prompt_messages(f.messages("Q"))


def test_tie_and_both_bad_make_no_pair_but_both_bad_feeds_kto(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    a, b = f.answer(db, "Q", "A" + LONG), f.answer(db, "Q", "B" + LONG)
    c, d = f.answer(db, "R", "C" + LONG), f.answer(db, "R", "D" + LONG)
    f.comparison(db, a, b, "tie")
    f.comparison(db, c, d, "both_bad")
    f.comparison(db, a, c, None)  # undecided
    with pytest.raises(Exception, match="only 0 preference pairs"):
        run(pairs_url, tmp_path)
    f.comparison(db, a, b, "a")  # so that a snapshot can be written
    pairs, snapshot = run(pairs_url, tmp_path)
    assert len(pairs) == 1
    rows = kto(pairs_url, snapshot.id)
    assert {(r["completion_id"], r["label"]) for r in rows} == {(c, False), (d, False)}


def test_correction_is_chosen_over_original(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    a = f.answer(db, "Q", "Wrong answer" + LONG)
    vote = f.vote(db, a, -1, correction="  The right answer" + LONG + "  ")
    (pair,), _ = run(pairs_url, tmp_path)
    assert (pair["rule"], pair["chosen"], pair["rejected"]) == (
        "correction",
        "The right answer" + LONG,
        "Wrong answer" + LONG,
    )
    assert pair["votes"] == [vote] and pair["completions"] == [a]


def test_thumbs_pair_every_up_with_every_down_of_the_same_prompt(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    ups = [f.answer(db, "Q", f"good {i}" + LONG) for i in range(2)]
    downs = [f.answer(db, "Q", f"bad {i}" + LONG) for i in range(2)]
    other = f.answer(db, "Other question", "bad elsewhere" + LONG)
    for u in ups:
        f.vote(db, u, 1)
    for d in downs + [other]:
        f.vote(db, d, -1)
    pairs, snapshot = run(pairs_url, tmp_path)
    assert {(p["chosen"][:6], p["rejected"][:5]) for p in pairs} == {
        ("good 0", "bad 0"),
        ("good 0", "bad 1"),
        ("good 1", "bad 0"),
        ("good 1", "bad 1"),
    }
    assert all(p["rule"] == "thumbs" and len(p["votes"]) == 2 for p in pairs)
    assert [r["completion_id"] for r in kto(pairs_url, snapshot.id)] == [other]  # unpaired


def test_thumbs_cap_keeps_widest_margins_deterministically(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    best = f.answer(db, "Q", "best" + LONG)
    for user in ("u1", "u2", "u3"):
        f.vote(db, best, 1, user)
    worst = f.answer(db, "Q", "worst" + LONG)
    for user in ("u1", "u2"):
        f.vote(db, worst, -1, user)
    fine = [f.answer(db, "Q", f"fine {i}" + LONG) for i in range(2)]
    meh = [f.answer(db, "Q", f"meh {i}" + LONG) for i in range(2)]
    for a in fine:
        f.vote(db, a, 1)
    for a in meh:
        f.vote(db, a, -1)
    pairs, first = run(pairs_url, tmp_path, pairs_per_prompt=2)
    assert len(pairs) == 2
    # margins: best-worst 5, then best-meh and fine-worst 4 (tie broken by hash)
    assert ("best" + LONG, "worst" + LONG) in {(p["chosen"], p["rejected"]) for p in pairs}
    again, second = run(pairs_url, tmp_path, pairs_per_prompt=2)
    assert [p["id"] for p in again] == [p["id"] for p in pairs]
    assert first.counts["dropped_pairs"]["over_cap"] == 3 * 3 - 2
    assert first.content_sha256 == second.content_sha256


def test_conflicting_votes_count_by_net_score(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    mostly_good = f.answer(db, "Q", "mostly good" + LONG)
    for user, rating in (("u1", 1), ("u2", 1), ("u3", -1)):
        f.vote(db, mostly_good, rating, user)
    split = f.answer(db, "Q", "split opinion" + LONG)
    f.vote(db, split, 1, "u1")
    f.vote(db, split, -1, "u2")
    bad = f.answer(db, "Q", "bad" + LONG)
    f.vote(db, bad, -1)
    (pair,), snapshot = run(pairs_url, tmp_path)
    assert (pair["chosen"], pair["rejected"]) == ("mostly good" + LONG, "bad" + LONG)
    assert snapshot.counts["dropped_answers"] == {"net_zero": 1}


def test_identical_pairs_after_normalization_are_dropped(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    up = f.answer(db, "Q", "Paris is the capital" + LONG)
    down = f.answer(db, "Q", "  paris IS the\n capital" + LONG.upper())
    f.vote(db, up, 1)
    f.vote(db, down, -1)
    keep = f.answer(db, "R", "ok" + LONG)
    f.vote(db, keep, -1, correction="better" + LONG)
    pairs, snapshot = run(pairs_url, tmp_path)
    assert [p["rule"] for p in pairs] == ["correction"]
    assert snapshot.counts["dropped_pairs"] == {"identical": 1}


def test_duplicates_merge_into_one_pair_with_all_sources(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    a = f.answer(db, "Q", "Good" + LONG)
    b = f.answer(db, "Q", "Poor" + LONG)
    up, down = f.vote(db, a, 1), f.vote(db, b, -1)
    cmp = f.comparison(db, a, b, "a")
    (pair,), snapshot = run(pairs_url, tmp_path)
    assert pair["rule"] == "choice"  # the most direct evidence names the rule
    assert set(pair["votes"]) == {up, down} and pair["comparisons"] == [cmp]
    assert snapshot.counts["dropped_pairs"] == {"duplicate": 1}


def test_length_filters(db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path) -> None:
    good = f.answer(db, "Q", "good" + LONG)
    short = f.answer(db, "Q", "no", tokens=3)
    f.vote(db, good, 1)
    f.vote(db, short, -1)
    long_prompt = f.answer(db, "Long", "x" + LONG, prompt_tokens=5000)
    f.vote(db, long_prompt, -1, correction="y" + LONG)
    brief_fix = f.answer(db, "R", "bad" + LONG)
    f.vote(db, brief_fix, -1, correction="ok")  # under 10 tokens (estimated)
    keep = f.answer(db, "S", "meh" + LONG)
    f.vote(db, keep, -1, correction="fine" + LONG)
    pairs, snapshot = run(pairs_url, tmp_path, min_answer_tokens=10, max_prompt_tokens=1024)
    assert [p["chosen"] for p in pairs] == ["fine" + LONG]
    assert snapshot.counts["dropped_answers"] == {"short_answer": 1, "long_prompt": 1}
    assert snapshot.counts["dropped_pairs"] == {"long_prompt": 1, "short_answer": 1}


def test_only_answers_of_production_or_base_count_unless_configured(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    old = f.adapter(db)
    prod = f.adapter(db, promote=True)
    for adapter, label in ((None, "base"), (prod, "production"), (old, "old")):
        a = f.answer(db, "Q " + label, label + LONG, adapter_id=adapter)
        f.vote(db, a, -1, correction="fixed " + label + LONG)
    pairs, snapshot = run(pairs_url, tmp_path)
    assert sorted(p["rejected"] for p in pairs) == sorted(["base" + LONG, "production" + LONG])
    assert snapshot.counts["dropped_answers"] == {"stale_model": 1}
    everything, _ = run(pairs_url, tmp_path, models="all")
    assert len(everything) == 3


def test_held_out_split_is_by_prompt_hash(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    for i in range(200):
        a = f.answer(db, f"question {i}", "wrong" + LONG)
        f.vote(db, a, -1, correction=f"right {i}" + LONG)
        f.vote(db, a, -1, user="other", correction=f"also right {i}" + LONG)
    pairs, snapshot = run(pairs_url, tmp_path, held_out_fraction=0.2)
    by_prompt: dict[str, set[str]] = {}
    for p in pairs:
        by_prompt.setdefault(p["prompt_sha256"], set()).add(p["split"])
        expected = "test" if int(p["prompt_sha256"][:8], 16) % 10000 < 2000 else "train"
        assert p["split"] == expected
    assert all(len(splits) == 1 for splits in by_prompt.values())
    test_share = snapshot.counts["splits"]["test"] / len(pairs)
    assert 0.1 < test_share < 0.3


def test_candidate_answers_are_stale_while_production_is_the_base(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    candidate = f.adapter(db)  # registered, never promoted: production is the base
    for adapter, label in ((None, "base"), (candidate, "candidate")):
        a = f.answer(db, "Q " + label, label + LONG, adapter_id=adapter)
        f.vote(db, a, -1, correction="fixed " + label + LONG)
    pairs, snapshot = run(pairs_url, tmp_path)
    assert [p["rejected"] for p in pairs] == ["base" + LONG]
    assert snapshot.counts["dropped_answers"] == {"stale_model": 1}


def test_identical_texts_do_not_use_up_the_cap(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    up = f.answer(db, "Q", "Paris" + LONG)
    for user in ("u1", "u2", "u3"):
        f.vote(db, up, 1, user)
    same = f.answer(db, "Q", "paris" + LONG)  # widest margin, but identical to `up`
    for user in ("u1", "u2", "u3"):
        f.vote(db, same, -1, user)
    other = f.answer(db, "Q", "London" + LONG)
    f.vote(db, other, -1)
    (pair,), snapshot = run(pairs_url, tmp_path, pairs_per_prompt=1)
    assert (pair["chosen"], pair["rejected"]) == ("Paris" + LONG, "London" + LONG)
    assert snapshot.counts["dropped_pairs"] == {"identical": 1}


def test_conversations_without_a_user_turn_do_not_share_a_prompt() -> None:
    first = [{"role": "system", "content": "Summarize the news."}]
    second = [{"role": "system", "content": "Write a haiku."}]
    assert prompt_messages(first) == first
    assert prompt_sha256(first) != prompt_sha256(second)


@pytest.mark.parametrize(
    "conversation",
    [
        [{"role": "system", "content": "only a system turn "}],
        [{"role": "user", "content": []}],
        [{"role": "user", "content": "\u00a0nbsp kept\u00a0"}],
        [{"role": "user", "content": " hi "}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "prefill"},
        ],
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "part 1 "}, {"type": "text", "text": "and 2"}],
            }
        ],
    ],
)
def test_sql_prompt_matches_python(db: psycopg.Connection[Any], conversation: list[Any]) -> None:
    row = db.execute(
        "SELECT ratchet_prompt(%s)", (psycopg.types.json.Jsonb(conversation),)
    ).fetchone()
    assert row is not None and row[0] == prompt_messages(conversation)
    trimmed = prompt_messages(conversation)
    assert prompt_sha256(conversation) == prompt_sha256(trimmed)  # hashing is idempotent
