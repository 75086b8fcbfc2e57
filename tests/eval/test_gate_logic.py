"""The gate's statistics, flags, diffs, policy and decisions, on constructed inputs."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eval import answers, gate, stats
from eval.errors import PolicyError
from eval.policy import Policy, load_policy
from eval.preference import PairScore
from ratchet.report import DiffSummary, FlagRate

POLICY = Policy()


def test_mcnemar_exact_matches_the_binomial_tail() -> None:
    # 10 discordant items, all favouring production: p = 2 * (1/2)^10.
    p, changed = stats.mcnemar_exact([True] * 10 + [False] * 5, [False] * 10 + [False] * 5)
    assert changed == 10 and p == pytest.approx(2 / 1024)
    # Balanced disagreement is no evidence at all.
    assert stats.mcnemar_exact([True, False] * 5, [False, True] * 5)[0] == 1.0
    assert stats.mcnemar_exact([True] * 3, [True] * 3) == (1.0, 0)
    with pytest.raises(ValueError):
        stats.mcnemar_exact([True], [True, False])


def test_paired_bootstrap_interval_brackets_the_mean_and_narrows_with_n() -> None:
    small = stats.paired_bootstrap([0.0] * 20, [1.0] * 10 + [0.0] * 10)
    large = stats.paired_bootstrap([0.0] * 400, [1.0] * 200 + [0.0] * 200)
    for mean, low, high in (small, large):
        assert low <= mean <= high and mean == pytest.approx(0.5)
    assert (large[2] - large[1]) < (small[2] - small[1]) / 2
    assert stats.bootstrap_ci([1.0] * 30) == (1.0, 1.0)


@given(st.text(max_size=60), st.text(max_size=60))
def test_char_diff_rebuilds_both_sides(old: str, new: str) -> None:
    ops = answers.char_diff(old, new)
    assert "".join(t for op, t in ops if op != "+") == old
    assert "".join(t for op, t in ops if op != "-") == new


@pytest.mark.parametrize(
    ("text", "finish", "expected"),
    [
        ("", "stop", ["empty"]),
        ("Paris is the capital of France.", "stop", []),
        ("Paris is the capital of", "length", ["hit_max_tokens"]),
        ("the cat sat on the mat " * 4, "stop", ["repetition"]),
        ("Sure!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!", "length", ["hit_max_tokens", "repetition"]),
        ("I'm sorry, but I can't help with that.", "stop", ["refusal"]),
        ("As an AI language model, I cannot browse.", "stop", ["refusal"]),
    ],
)
def test_flags(text: str, finish: str, expected: list[str]) -> None:
    assert answers.flags(text, finish) == expected


def test_policy_file_errors_are_clear(tmp_path: Path) -> None:
    assert load_policy().mode == "review"  # the shipped file loads
    bad = tmp_path / "policy.yaml"
    bad.write_text("mode: sometimes\n")
    with pytest.raises(PolicyError, match="mode"):
        load_policy(bad)
    bad.write_text("benchmarks: {max_regresion: 0.02}\n")  # a typo must not pass silently
    with pytest.raises(PolicyError, match="max_regresion"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def summary(candidate_loops: float = 0.0) -> DiffSummary:
    flags = {f: FlagRate(production=0.1, candidate=0.1) for f in answers_flags()}
    flags["repetition"] = FlagRate(production=0.0, candidate=candidate_loops)
    return DiffSummary(n=50, identical=0.2, mean_length_ratio=1.0, flags=flags)


def answers_flags() -> tuple[str, ...]:
    from ratchet.report import FLAGS

    return FLAGS


def pair(cand_right: bool, prod_right: bool) -> PairScore:
    # base log-probs equal, so the candidate's implicit reward ranks by its own log-probs
    return PairScore(
        base_c=-10, base_r=-10,
        cand_c=-5 if cand_right else -15, cand_r=-10,
        prod_c=-9 if prod_right else -11, prod_r=-10,
    )  # fmt: skip


def test_a_clear_preference_gain_with_no_regression_passes() -> None:
    bench = gate.benchmark_score("arc", [True] * 50 + [False] * 50, [True] * 51 + [False] * 49,
                                 POLICY)  # fmt: skip
    pref = gate.preference([pair(True, i % 2 == 0) for i in range(40)], POLICY)
    decision = gate.decide(POLICY, [bench], pref, summary())
    assert decision.decision == "pass", decision.reasons
    assert {c.name for c in decision.criteria} >= {"benchmark:arc", "preference", "flag:empty"}


def test_each_failing_criterion_is_named() -> None:
    # 30 items production got right and the candidate got wrong: significant, -30 points.
    bench = gate.benchmark_score("mmlu", [True] * 60 + [False] * 40, [True] * 30 + [False] * 70,
                                 POLICY)  # fmt: skip
    assert bench.p_value < 0.001 and bench.delta == pytest.approx(-0.3)
    worse = gate.preference([pair(False, True) for _ in range(40)], POLICY)
    decision = gate.decide(POLICY, [bench], worse, summary(candidate_loops=0.5))
    assert decision.decision == "fail"
    failed = {c.name for c in decision.criteria if not c.passed}
    assert failed == {"benchmark:mmlu", "preference", "flag:repetition"}
    assert all(r.split(":")[0] in {"benchmark", "preference", "flag"} for r in decision.reasons)


def test_small_noisy_differences_do_not_fail_and_missing_evidence_does() -> None:
    # 3 items lost, 1 gained on 100: -2 points but nowhere near significant.
    prod = [True] * 3 + [False] + [True] * 50 + [False] * 46
    cand = [False] * 3 + [True] + [True] * 50 + [False] * 46
    bench = gate.benchmark_score("hellaswag", prod, cand, POLICY)
    assert bench.delta == pytest.approx(-0.02) and bench.p_value > 0.5
    no_pairs = gate.decide(POLICY, [bench], None, summary())
    assert no_pairs.decision == "fail"
    assert no_pairs.reasons == [
        "preference: 0 held-out pairs; at least 10 are needed to measure it"
    ]
    lenient = POLICY.model_copy(
        update={"preference": POLICY.preference.model_copy(update={"required": False})}
    )
    assert gate.decide(lenient, [bench], None, summary()).decision == "pass"


def test_a_gain_within_noise_does_not_pass() -> None:
    # candidate right on 12 of 20, production on 10 of 20: the CI of the gain spans 0.
    scores = [pair(i < 12, i % 2 == 0) for i in range(20)]
    pref = gate.preference(scores, POLICY)
    assert pref.candidate > pref.production and pref.ci_low <= 0
    decision = gate.decide(POLICY, [], pref, summary())
    assert decision.decision == "fail" and decision.reasons[0].startswith("preference:")
