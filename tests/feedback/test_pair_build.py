"""What the pair build does for speed keeps its results: the whitespace normalization's
shortcut, the parquet schema written without `datasets`, and the stage timings."""

from pathlib import Path
from typing import Any

import psycopg
import pytest
from datasets import Features, List, Value
from hypothesis import given, settings
from hypothesis import strategies as st

from feedback.pairs import rules
from feedback.pairs.build import Timings, build
from feedback.pairs.files import KTO_SCHEMA, PAIR_SCHEMA
from ratchet.config import PairSettings
from tests.feedback import factories as f

# Every character Postgres's \s may match in a UTF-8 database, and some it must not.
SPACES = " \t\n\r\v\f\u0085\u00a0\u1680\u2000\u2003\u2007\u200b\u2028\u2029\u202f\u205f\u3000"
TRICKY = [
    "",
    " ",
    "a b",
    "a\nb",
    "a\n b",
    "a \nb",
    "a\n\nb",
    "a  b",
    "\na b\n",
    " a\tb ",
    "A\u00a0B",
    "a\u2003b",
    "a\u3000b\n",
    "a\r\nb",
    "line one\nline two\n\n- item\n",
]


def _norms(conn: psycopg.Connection[Any], texts: list[str]) -> list[tuple[str, str]]:
    return [
        (r[0], r[1])
        for r in conn.execute(
            f"SELECT {rules._norm('t')}, lower(btrim(regexp_replace(t, '\\s+', ' ', 'g')))"
            " FROM unnest(%s::text[]) WITH ORDINALITY AS u (t, i) ORDER BY i",
            (texts,),
        )
    ]


def test_normalization_shortcut_matches_the_regex(db: psycopg.Connection[Any]) -> None:
    for fast, slow in _norms(db, TRICKY + [f"a{c}b" for c in SPACES]):
        assert fast == slow


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(alphabet=st.sampled_from("ab" + SPACES), max_size=12), max_size=40))
def test_normalization_shortcut_matches_the_regex_on_any_text(
    pairs_url: str, texts: list[str]
) -> None:
    with psycopg.connect(pairs_url) as conn:
        for fast, slow in _norms(conn, texts):
            assert fast == slow


def _message() -> List:
    return List({"role": Value("string"), "content": Value("string")})


@pytest.mark.parametrize(
    ("schema", "features"),
    [
        (
            PAIR_SCHEMA,
            {
                "id": Value("string"),
                "rule": Value("string"),
                "prompt": _message(),
                "chosen": _message(),
                "rejected": _message(),
            },
        ),
        (KTO_SCHEMA, {"prompt": _message(), "completion": _message(), "label": Value("bool")}),
    ],
)
def test_parquet_schema_is_what_datasets_makes(schema: Any, features: dict[str, Any]) -> None:
    assert schema.equals(Features(features).arrow_schema, check_metadata=True)


def test_build_reports_every_stage(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    ups = [f.answer(db, "why?", f"good answer {i} " * 5) for i in range(3)]
    downs = [f.answer(db, "why?", f"bad answer {i} " * 5) for i in range(3)]
    for i, a in enumerate(ups + downs):
        f.vote(db, a, 1 if a in ups else -1, user=f"u{i}")
    timings = Timings()
    snapshot = build(pairs_url, PairSettings(pairs_per_prompt=4), tmp_path, timings=timings)
    # 9 thumbs pairs, 4 kept: the others are counted without a candidate row each
    assert snapshot.counts["pairs"]["thumbs"] == 4
    assert snapshot.counts["dropped_pairs"] == {"over_cap": 5}
    assert list(timings) == [
        "connect",
        "answers",
        "choice_pairs",
        "correction_pairs",
        "thumbs_pairs",
        "voter_cap",
        "merge",
        "kto_rows",
        "counts",
        "read_rows",
        "parquet",
        "content_hash",
        "commit",
    ]
    assert all(seconds >= 0 for seconds in timings.values())
