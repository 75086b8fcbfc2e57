"""From per-item results to scores with intervals, and from scores to a decision."""

from collections.abc import Sequence

from eval import stats
from eval.judge import Verdict, score
from eval.policy import Policy
from eval.preference import PairScore
from ratchet.report import (
    BenchmarkScore,
    Criterion,
    Decision,
    DiffSummary,
    JudgeResult,
    Preference,
)


def benchmark_score(
    task: str,
    production: Sequence[bool],
    candidate: Sequence[bool],
    policy: Policy,
    chance: float | None = None,
) -> BenchmarkScore:
    """Accuracy of both models on the same items, the paired delta's CI, McNemar, and
    whether the benchmark can tell anything: it cannot when production's accuracy
    interval includes `chance` (the accuracy of guessing among each item's choices),
    nor when its items are too few to detect a regression of the policy's
    max_regression with the policy's power."""
    prod = [float(x) for x in production]
    cand = [float(x) for x in candidate]
    delta, low, high = stats.paired_bootstrap(prod, cand, *_boot(policy))
    p_value, changed = stats.mcnemar_exact(production, candidate)
    accuracy = sum(prod) / len(prod)
    production_ci = stats.bootstrap_ci(prod, *_boot(policy))
    rule = policy.benchmarks
    needed = stats.items_to_detect_drop(accuracy, rule.max_regression, policy.alpha, rule.power)
    because = []
    at_chance = chance is not None and production_ci[0] <= chance <= production_ci[1]
    if at_chance:
        low_acc, high_acc = production_ci
        because.append(
            f"production's accuracy {accuracy:.1%} (CI {low_acc:.1%}..{high_acc:.1%})"
            f" is not above chance ({chance:.1%})"
        )
    if len(prod) < needed:
        because.append(
            f"{len(prod)} items; detecting a {rule.max_regression:.1%} regression with "
            f"{rule.power:.0%} power needs {needed}"
        )
    return BenchmarkScore(
        task=task,
        n=len(prod),
        production=accuracy,
        candidate=sum(cand) / len(cand),
        delta=delta,
        ci_low=low,
        ci_high=high,
        production_ci=production_ci,
        candidate_ci=stats.bootstrap_ci(cand, *_boot(policy)),
        p_value=p_value,
        changed=changed,
        chance=chance,
        items_needed=needed,
        at_chance=at_chance,
        informative=not because,
        uninformative_because=because,
    )


def preference(scores: Sequence[PairScore], policy: Policy) -> Preference:
    prod = [float(s.production_correct) for s in scores]
    cand = [float(s.candidate_correct) for s in scores]
    delta, low, high = stats.paired_bootstrap(prod, cand, *_boot(policy))
    n = len(scores)
    return Preference(
        n=n,
        production=sum(prod) / n,
        candidate=sum(cand) / n,
        candidate_logprob=sum(s.candidate_logprob_correct for s in scores) / n,
        delta=delta,
        ci_low=low,
        ci_high=high,
        candidate_ci=stats.bootstrap_ci(cand, *_boot(policy)),
    )


def judge(model: str, verdicts: Sequence[Verdict], policy: Policy) -> JudgeResult:
    values = [score(v) for v in verdicts]
    low, high = stats.bootstrap_ci(
        values, samples=policy.bootstrap_samples, confidence=policy.confidence
    )
    return JudgeResult(
        model=model,
        n=len(values),
        candidate_wins=sum(v == "candidate" for v in verdicts),
        production_wins=sum(v == "production" for v in verdicts),
        ties=sum(v == "tie" for v in verdicts),
        win_rate=sum(values) / len(values),
        ci_low=low,
        ci_high=high,
    )


def decide(
    policy: Policy,
    benchmarks: Sequence[BenchmarkScore],
    pref: Preference | None,
    diff: DiffSummary,
    judged: JudgeResult | None = None,
) -> Decision:
    criteria = [_benchmark(b, policy) for b in benchmarks]
    if policy.benchmarks.min_informative:
        criteria.append(_enough_benchmarks(benchmarks, policy))
    criteria.append(_preference(pref, policy))
    criteria += _flags(diff, policy)
    if judged is not None:
        criteria.append(_judge(judged, policy))
    failed = [c for c in criteria if not c.passed]
    evidence = [c for c in criteria if c.informative] or criteria
    return Decision(
        decision="fail" if failed else "pass",
        reasons=[f"{c.name}: {c.detail}" for c in (failed or evidence)],
        criteria=criteria,
    )


def _boot(policy: Policy) -> tuple[int, float]:
    """The bootstrap's (samples, confidence) from the policy."""
    return policy.bootstrap_samples, policy.confidence


def _benchmark(b: BenchmarkScore, policy: Policy) -> Criterion:
    """A benchmark at chance neither passes nor fails: its differences are noise. One
    only too small to detect a regression of max_regression passes nothing (no
    regression seen is no evidence), but a significant regression larger than that
    still fails it: a detection is evidence whatever the power was."""
    tolerance = policy.benchmarks.max_regression
    regressed = b.delta < -tolerance and b.p_value < policy.alpha
    summary = (
        f"accuracy {b.production:.1%} -> {b.candidate:.1%} ({b.delta:+.1%}, "
        f"CI {b.ci_low:+.1%}..{b.ci_high:+.1%}, McNemar p={b.p_value:.3f}, n={b.n})"
    )
    name = f"benchmark:{b.task}"
    if regressed and not b.at_chance:
        detail = f"significant regression beyond {tolerance:.1%}: {summary}"
        return Criterion(name=name, passed=False, detail=detail)
    if not b.informative:
        detail = f"uninformative ({'; '.join(b.uninformative_because)}): {summary}"
        return Criterion(name=name, passed=True, detail=detail, informative=False)
    detail = f"no significant regression beyond {tolerance:.1%}: {summary}"
    return Criterion(name=name, passed=True, detail=detail)


def _enough_benchmarks(benchmarks: Sequence[BenchmarkScore], policy: Policy) -> Criterion:
    wanted = policy.benchmarks.min_informative
    informative = [b.task for b in benchmarks if b.informative]
    detail = (
        f"{len(informative)} of {len(benchmarks)} benchmarks informative "
        f"({', '.join(informative) or 'none'}); the policy requires {wanted}"
    )
    return Criterion(name="benchmarks", passed=len(informative) >= wanted, detail=detail)


def _preference(pref: Preference | None, policy: Policy) -> Criterion:
    rule = policy.preference
    if pref is None or pref.n < rule.min_pairs:
        have = 0 if pref is None else pref.n
        detail = f"{have} held-out pairs; at least {rule.min_pairs} are needed to measure it"
        return Criterion(name="preference", passed=not rule.required, detail=detail)
    passed = pref.ci_low > rule.min_gain
    verdict = "beats" if passed else "does not beat"
    detail = (
        f"held-out accuracy {pref.production:.1%} -> {pref.candidate:.1%} on {pref.n} pairs; "
        f"CI of the gain {pref.ci_low:+.1%}..{pref.ci_high:+.1%} {verdict} {rule.min_gain:+.1%}"
    )
    return Criterion(name="preference", passed=passed, detail=detail)


def _flags(diff: DiffSummary, policy: Policy) -> list[Criterion]:
    out = []
    for flag, limit in policy.diff.max_flag_increase.items():
        rate = diff.flags[flag]
        rise = rate.candidate - rate.production
        passed = rise <= limit
        detail = (
            f"{flag} rate {rate.production:.1%} -> {rate.candidate:.1%} on {diff.n} prompts "
            f"({rise:+.1%}; limit +{limit:.1%})"
        )
        out.append(Criterion(name=f"flag:{flag}", passed=passed, detail=detail))
    return out


def _judge(j: JudgeResult, policy: Policy) -> Criterion:
    floor = policy.judge.min_win_rate
    passed = j.ci_high >= floor
    detail = (
        f"{j.model}: win rate {j.win_rate:.1%} (CI {j.ci_low:.1%}..{j.ci_high:.1%}; "
        f"{j.candidate_wins} wins, {j.production_wins} losses, {j.ties} ties); "
        f"{'not ' if passed else ''}significantly below {floor:.0%}"
    )
    return Criterion(name="judge", passed=passed, detail=detail)
