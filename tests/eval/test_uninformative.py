"""Benchmarks that cannot decide say so: at chance, or too small for the regression the
policy guards against. Constructed per-item results; SmolLM2's own are in
test_benchmarks.py."""

import numpy as np
import pytest

from eval import gate, stats
from eval.policy import BenchmarkPolicy, Policy
from ratchet.report import BenchmarkScore
from serve import render
from tests.eval.test_gate_logic import pair, summary

POLICY = Policy()


def test_items_needed_matches_the_two_proportion_reference() -> None:
    # The textbook case: 50% against 40%, two-sided 5%, 80% power: 387.3 a group.
    assert stats.items_to_detect_drop(0.5, 0.1) == 388
    assert stats.items_to_detect_drop(0.5, 0.1, power=0.9) == 519
    # Smaller drops need quadratically more: a 1-point drop from 50% takes ~39,000.
    assert 38_000 < stats.items_to_detect_drop(0.5, 0.01) < 40_000
    with pytest.raises(ValueError):
        stats.items_to_detect_drop(0.5, 0.0)


def test_that_many_items_do_detect_the_drop_four_times_in_five() -> None:
    n = stats.items_to_detect_drop(0.5, 0.1)
    rng = np.random.default_rng(0)

    def power(items: int) -> float:
        a = rng.binomial(items, 0.5, 20_000) / items
        b = rng.binomial(items, 0.4, 20_000) / items
        pooled = (a + b) / 2
        z = (a - b) / np.sqrt(2 * pooled * (1 - pooled) / items)
        return float((np.abs(z) > 1.96).mean())

    assert power(n) == pytest.approx(0.80, abs=0.015)
    assert power(n // 2) < 0.6


def same(task: str, right: int, n: int, policy: Policy, chance: float = 0.25) -> BenchmarkScore:
    """Both models right on the same `right` of `n` items."""
    items = [True] * right + [False] * (n - right)
    return gate.benchmark_score(task, items, list(items), policy, chance=chance)


def test_a_benchmark_at_chance_is_marked_and_decides_nothing() -> None:
    lenient = Policy(benchmarks=BenchmarkPolicy(max_regression=0.2))  # 200 items are enough
    at_chance = same("mmlu", 50, 200, lenient)
    assert at_chance.at_chance and not at_chance.informative and at_chance.items_needed
    assert at_chance.items_needed <= 200
    above = same("arc", 120, 200, lenient)
    assert above.informative and not above.at_chance and above.uninformative_because == []
    # At chance even a "significant" drop is noise: it fails nothing.
    dropped = gate.benchmark_score("mmlu", [True] * 50 + [False] * 150,
                                   [False] * 30 + [True] * 20 + [False] * 150, lenient,
                                   chance=0.25)  # fmt: skip
    assert dropped.p_value < 0.001 and dropped.at_chance
    pref = gate.preference([pair(True, i % 2 == 0) for i in range(40)], lenient)
    decision = gate.decide(lenient, [at_chance, above, dropped], pref, summary())
    assert decision.decision == "pass", decision.reasons
    marks = {c.name: c for c in decision.criteria}
    assert not marks["benchmark:mmlu"].informative and "not above chance" in marks[
        "benchmark:mmlu"].detail  # fmt: skip
    assert marks["benchmark:arc"].informative
    # The reasons a pass gives are the evidence that carried it, not the benchmark at chance.
    assert not any("not above chance" in r for r in decision.reasons)


def test_an_underpowered_benchmark_passes_nothing_but_a_detected_regression_still_fails() -> None:
    small = gate.benchmark_score("arc", [True] * 60 + [False] * 40, [True] * 61 + [False] * 39,
                                 POLICY, chance=0.25)  # fmt: skip
    assert not small.informative and not small.at_chance
    assert small.items_needed is not None and small.items_needed > 100
    assert f"needs {small.items_needed}" in small.uninformative_because[0]
    lost = gate.benchmark_score("arc", [True] * 60 + [False] * 40, [True] * 30 + [False] * 70,
                                POLICY, chance=0.25)  # fmt: skip
    pref = gate.preference([pair(True, i % 2 == 0) for i in range(40)], POLICY)
    assert gate.decide(POLICY, [small], pref, summary()).decision == "pass"
    failed = gate.decide(POLICY, [lost], pref, summary())
    assert failed.decision == "fail" and failed.reasons[0].startswith("benchmark:arc")


def test_the_policy_can_require_informative_benchmarks() -> None:
    strict = Policy(benchmarks=BenchmarkPolicy(max_regression=0.2, min_informative=2))
    good, noise = same("arc", 120, 200, strict), same("mmlu", 50, 200, strict)
    pref = gate.preference([pair(True, i % 2 == 0) for i in range(40)], strict)
    decision = gate.decide(strict, [good, noise], pref, summary())
    assert decision.decision == "fail"
    assert decision.reasons == [
        "benchmarks: 1 of 2 benchmarks informative (arc); the policy requires 2"
    ]


def test_the_report_and_its_markdown_say_uninformative() -> None:
    from tests.serve.test_report_page import report

    noise = same("mmlu", 5, 20, POLICY)
    pref = gate.preference([pair(True, i % 2 == 0) for i in range(40)], POLICY)
    r = report()
    r.benchmarks = [noise]
    r.decision = gate.decide(POLICY, [noise], pref, summary())
    page, md = render.html(r), render.markdown(r)
    assert '<span class="tag">uninformative</span>' in page
    needed = f"{noise.items_needed:,}"
    assert f"uninformative: at chance (25.0%), needs {needed} items" in page
    assert "⚪ uninformative **benchmark:mmlu**" in md and "| uninformative: at chance" in md
