"""One evaluation, start to finish: candidate vs current production on the same items.

Stages, each reported as progress on the `evaluations` row: benchmarks (lm-eval),
the greedy A/B diff (vLLM), held-out preference accuracy, the optional judge. Then
the gate decides, the report and per-item evidence are stored together, and the
candidate's status follows the decision (in `auto` mode a pass also promotes).
"""

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from eval import gate, greedy
from eval.benchmarks import ItemResult, check_adapter_applied, run_benchmarks
from eval.errors import EvalError, EvaluationFailed
from eval.judge import Judge, judge_all
from eval.policy import Policy, load_policy
from eval.preference import HeldOutPair, score_pairs
from ratchet import evaluations, promotion, registry
from ratchet.engine import EngineClient
from ratchet.registry import Adapter
from ratchet.replicas import EngineSet
from ratchet.report import (
    Answer,
    BenchmarkScore,
    DiffItem,
    JudgeResult,
    ModelRef,
    Preference,
    Report,
    Review,
)
from ratchet.settings import Settings

log = logging.getLogger(__name__)
Progress = Callable[[str, float], Coroutine[Any, Any, None]]
# Where each stage's progress lands on the overall 0..1 scale.
STAGES = {
    "benchmarks": (0.0, 0.6),
    "greedy diff": (0.6, 0.8),
    "preference": (0.8, 0.95),
    "judge": (0.95, 1.0),
}


@dataclass
class Evidence:
    benchmarks: list[BenchmarkScore]
    diffs: list[DiffItem]
    preference: Preference | None
    judge: JudgeResult | None
    items: list[tuple[str, str, Any, Any]]
    timings: dict[str, float]


async def evaluate(
    settings: Settings,
    conn: AsyncConnection,
    evaluation_id: int,
    on_progress: Callable[[str, float], None] = lambda stage, fraction: None,
) -> evaluations.Evaluation:
    """Run a queued evaluation; a failure is recorded on the row and re-raised."""
    evaluation = await evaluations.get(conn, evaluation_id)
    if evaluation is None or evaluation.status != "queued":
        raise EvaluationFailed(f"evaluation {evaluation_id} is not queued")
    candidate = await registry.get_by_id(conn, evaluation.adapter_id)
    assert candidate is not None
    production = await registry.production(conn)
    # Atomic: of two jobs for one row (a job queued again by the sweep), one runs it.
    if not await evaluations.start(conn, evaluation_id, production.id if production else None):
        raise EvaluationFailed(f"evaluation {evaluation_id} was started by another worker")
    await registry.set_status(conn, candidate.id, "evaluating")

    async def progress(stage: str, fraction: float) -> None:
        low, high = STAGES[stage]
        overall = low + (high - low) * fraction
        on_progress(stage, overall)
        await evaluations.progress(conn, evaluation_id, stage, overall)

    beating = asyncio.create_task(_heartbeat(conn, evaluation_id, settings.run_heartbeat_s))
    try:
        policy = load_policy(settings.eval.policy_file)
        await promotion.check_files(candidate)
        evidence = await gather(settings, conn, candidate, production, policy, progress)
        report = await _report(
            settings, conn, evaluation_id, candidate, production, policy, evidence
        )
        await evaluations.finish(conn, evaluation_id, report, evidence.items)
    except (EvalError, promotion.PromotionError) as exc:
        await _failed(conn, evaluation_id, candidate, str(exc))
        raise EvaluationFailed(str(exc)) from exc
    except BaseException as exc:
        await _failed(conn, evaluation_id, candidate, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        beating.cancel()
    await _apply_decision(settings, conn, evaluation_id, candidate, report)
    done = await evaluations.get(conn, evaluation_id)
    assert done is not None
    return done


async def _heartbeat(conn: AsyncConnection, evaluation_id: int, every: float) -> None:
    """Beat while a stage runs in a thread for minutes, so that a worker starting
    elsewhere does not take this evaluation for abandoned."""
    while True:
        await asyncio.sleep(every)
        with contextlib.suppress(Exception):  # a missed beat is not worth a failure
            await evaluations.beat(conn, evaluation_id)


async def gather(
    settings: Settings,
    conn: AsyncConnection,
    candidate: Adapter,
    production: Adapter | None,
    policy: Policy,
    progress: Progress,
) -> Evidence:
    timings: dict[str, float] = {}
    items: list[tuple[str, str, Any, Any]] = []

    started = time.monotonic()
    await progress("benchmarks", 0.0)
    benchmarks = await _benchmarks(settings, candidate, production, policy, items, progress)
    timings["benchmarks"] = time.monotonic() - started

    started = time.monotonic()
    pairs = await held_out_pairs(conn, candidate, settings.eval.max_held_out_prompts)
    await progress("greedy diff", 0.0)
    diffs = await _greedy(settings, candidate, production, pairs, progress)
    items += [
        ("diff", str(i), d.production.model_dump(), d.candidate.model_dump())
        for i, d in enumerate(diffs)
    ]
    timings["greedy_diff"] = time.monotonic() - started

    started = time.monotonic()
    await progress("preference", 0.0)
    pref = await _preference(settings, candidate, production, pairs, policy, items, progress)
    timings["preference"] = time.monotonic() - started

    judged = None
    if settings.eval.judge_url:
        started = time.monotonic()
        await progress("judge", 0.0)
        judged = await asyncio.to_thread(_judge, settings, diffs, policy)
        timings["judge"] = time.monotonic() - started
    await progress("judge", 1.0)
    return Evidence(benchmarks, diffs, pref, judged, items, timings)


async def held_out_pairs(
    conn: AsyncConnection, candidate: Adapter, limit: int
) -> list[HeldOutPair]:
    """The test split of the snapshot the candidate was trained on (else the latest)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, prompt, chosen, rejected FROM pairs WHERE split = 'test' AND snapshot_id"
            " = coalesce((SELECT snapshot_id FROM adapters WHERE id = %s),"
            " (SELECT max(id) FROM snapshots)) ORDER BY id LIMIT %s",
            (candidate.id, limit),
        )
        rows = await cur.fetchall()
    return [HeldOutPair(r["id"], r["prompt"], r["chosen"], r["rejected"]) for r in rows]


async def _benchmarks(
    settings: Settings,
    candidate: Adapter,
    production: Adapter | None,
    policy: Policy,
    items: list[tuple[str, str, Any, Any]],
    progress: Progress,
) -> list[BenchmarkScore]:
    cfg = settings.eval
    if not cfg.tasks and not cfg.extra_tasks:
        return []

    def run(adapter: Adapter | None) -> dict[str, list[ItemResult]]:
        return run_benchmarks(
            settings.base_model_ref,
            adapter.path if adapter else None,
            data_dir=settings.eval_dir,
            tasks=cfg.tasks,
            items=cfg.items,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            backend=cfg.backend,
            extra_tasks=cfg.extra_tasks,
        )

    prod = await asyncio.to_thread(_cached, settings, production, run)
    await progress("benchmarks", 0.5)
    cand = await asyncio.to_thread(run, candidate)
    await progress("benchmarks", 1.0)
    check_adapter_applied(prod, cand)
    scores = []
    for task in sorted(prod):
        by_id = {r.doc_id: r for r in cand[task]}
        both = [(p, by_id[p.doc_id]) for p in prod[task] if p.doc_id in by_id]
        for p, c in both:
            items.append((f"benchmark:{task}", str(p.doc_id), _item(p), _item(c)))
        # Guessing gets 1 in k of an item with k choices right.
        chance = sum(1 / len(p.logliks) for p, _ in both) / len(both) if both else None
        scores.append(
            gate.benchmark_score(
                task,
                [p.correct for p, _ in both],
                [c.correct for _, c in both],
                policy,
                chance=chance,
            )
        )
    return scores


def _cached(
    settings: Settings,
    production: Adapter | None,
    run: Callable[[Adapter | None], dict[str, list[ItemResult]]],
) -> dict[str, list[ItemResult]]:
    """Production's benchmark results, kept on disk: every candidate is compared with the
    same production, so only the first evaluation pays for scoring it. The key holds
    everything that moves a log-likelihood (batching shifts fp32 sums by ~1e-5), or an
    adapter that changes nothing could slip past check_adapter_applied."""
    cfg = settings.eval
    key = json.dumps(
        [
            settings.base_model_ref,
            production.sha256 if production else None,
            cfg.tasks,
            cfg.extra_tasks,
            cfg.items,
            cfg.seed,
            cfg.backend,
            cfg.batch_size,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = settings.eval_dir / "cache" / f"production-{digest}.json"
    if path.is_file():
        raw = json.loads(path.read_text())
        return {t: [ItemResult.model_validate(r) for r in rows] for t, rows in raw.items()}
    results = run(production)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({t: [r.model_dump() for r in rows] for t, rows in results.items()}))
    tmp.replace(path)
    return results


def _item(result: ItemResult) -> dict[str, Any]:
    return {"correct": result.correct, "logliks": result.logliks}


async def _greedy(
    settings: Settings,
    candidate: Adapter,
    production: Adapter | None,
    pairs: list[HeldOutPair],
    progress: Progress,
) -> list[DiffItem]:
    seen: set[str] = set()
    prompts = []
    for pair in pairs:  # one greedy answer per distinct held-out prompt
        key = json.dumps(pair.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(greedy.Prompt("held_out", pair.prompt))
    prompts += greedy.regression_prompts()
    engine = EngineClient(settings.engine_base_url, settings.engine_timeouts)
    try:
        base_name = await _base_name(engine)
        await greedy.ensure_loaded(engine, candidate.engine_name, candidate.path)
        if production is not None:
            await greedy.ensure_loaded(engine, production.engine_name, production.path)
        cfg = settings.eval
        limit = asyncio.Semaphore(cfg.diff_concurrency)
        answered = 0

        async def answers(model: str) -> list[Answer]:
            nonlocal answered
            result = await greedy.answer_all(engine, model, prompts, cfg.diff_max_tokens, limit)
            answered += 1
            await progress("greedy diff", answered / 2)
            return result

        # Both models at once: the engine batches base and LoRA requests together, so
        # neither model's last few answers run in a batch of their own.
        both = [
            asyncio.ensure_future(answers(production.engine_name if production else base_name)),
            asyncio.ensure_future(answers(candidate.engine_name)),
        ]
        try:
            prod_answers, cand_answers = await asyncio.gather(*both)
        except BaseException:
            for pending in both:
                pending.cancel()
            raise
    finally:
        await engine.aclose()
    return greedy.compare(prompts, prod_answers, cand_answers)


async def _base_name(engine: EngineClient) -> str:
    from eval.errors import EngineNotReady
    from ratchet.engine import EngineUnavailable

    try:
        models = await engine.models()
    except EngineUnavailable as exc:
        raise EngineNotReady(
            f"the greedy diff needs the vLLM engine at {engine.base_url}, which is not "
            "reachable: start `ratchet serve` or set RATCHET_ENGINE_URL"
        ) from exc
    roots = [m["id"] for m in models if not m.get("parent")]
    if not roots:
        raise EngineNotReady(f"the engine at {engine.base_url} lists no base model")
    return str(roots[0])


async def _preference(
    settings: Settings,
    candidate: Adapter,
    production: Adapter | None,
    pairs: list[HeldOutPair],
    policy: Policy,
    items: list[tuple[str, str, Any, Any]],
    progress: Progress,
) -> Preference | None:
    if not pairs:
        return None
    scores = await asyncio.to_thread(
        score_pairs,
        settings.base_model_ref,
        candidate.path,
        production.path if production else None,
        pairs,
    )
    await progress("preference", 1.0)
    for pair, s in zip(pairs, scores, strict=True):
        items.append(
            (
                "preference",
                pair.id,
                {"chosen": s.prod_c, "rejected": s.prod_r, "correct": s.production_correct},
                {
                    "chosen": s.cand_c,
                    "rejected": s.cand_r,
                    "base_chosen": s.base_c,
                    "base_rejected": s.base_r,
                    "correct": s.candidate_correct,
                },
            )
        )
    return gate.preference(scores, policy)


def _judge(settings: Settings, diffs: list[DiffItem], policy: Policy) -> JudgeResult:
    cfg = settings.eval
    key = cfg.judge_api_key.get_secret_value() if cfg.judge_api_key else None
    model = cfg.judge_model or "judge"
    judge = Judge(cfg.judge_url or "", model, key)
    try:
        verdicts = judge_all(judge, diffs)
    finally:
        judge.close()
    return gate.judge(model, verdicts, policy)


async def _report(
    settings: Settings,
    conn: AsyncConnection,
    evaluation_id: int,
    candidate: Adapter,
    production: Adapter | None,
    policy: Policy,
    ev: Evidence,
) -> Report:
    decision = gate.decide(
        policy, ev.benchmarks, ev.preference, summary := greedy.summarize(ev.diffs), ev.judge
    )
    card = _training_card(Path(candidate.path))
    return Report(
        evaluation_id=evaluation_id,
        created_at=await _now(conn),
        candidate=_ref(candidate),
        production=_ref(production),
        base_model=settings.base_model_ref,
        mode=policy.mode,
        policy=policy.model_dump(),
        decision=decision,
        benchmarks=ev.benchmarks,
        preference=ev.preference,
        diff_summary=summary,
        diffs=ev.diffs,
        judge=ev.judge,
        training_card=card,
        training_curve=await _curve(conn, candidate),
        timings_s={k: round(v, 2) for k, v in ev.timings.items()},
        review=Review(status="pending" if policy.mode == "review" else "not_needed"),
    )


def _ref(adapter: Adapter | None) -> ModelRef:
    if adapter is None:
        return ModelRef(label="base")
    return ModelRef(
        label=adapter.engine_name,
        adapter_id=str(adapter.id),
        sha256=adapter.sha256,
        path=adapter.path,
    )


def _training_card(path: Path) -> dict[str, Any] | None:
    try:
        card: dict[str, Any] = json.loads((path / registry.TRAINING_CARD).read_text())
    except (OSError, ValueError):
        return None
    return card


async def _curve(conn: AsyncConnection, candidate: Adapter) -> list[dict[str, float]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT m.step, m.name, m.value FROM run_metrics m JOIN adapters a"
            " ON a.run_id = m.run_id WHERE a.id = %s AND m.name IN ('loss', 'eval_loss')"
            " ORDER BY m.step",
            (candidate.id,),
        )
        rows = await cur.fetchall()
    return [{"step": r["step"], r["name"]: r["value"]} for r in rows]


async def _now(conn: AsyncConnection) -> Any:
    cur = await conn.execute("SELECT now()")
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def _failed(
    conn: AsyncConnection, evaluation_id: int, candidate: Adapter, error: str
) -> None:
    log.warning("evaluation %s failed: %s", evaluation_id, error)
    await evaluations.fail(conn, evaluation_id, error)
    await registry.set_status(conn, candidate.id, "candidate")


async def _apply_decision(
    settings: Settings,
    conn: AsyncConnection,
    evaluation_id: int,
    candidate: Adapter,
    report: Report,
) -> None:
    if report.decision.decision == "fail":
        await registry.set_status(conn, candidate.id, "rejected")
        return
    await registry.set_status(
        conn, candidate.id, "passed" if report.mode == "auto" else "awaiting_review"
    )
    if report.mode == "auto":
        # Every reachable replica, as the gateway's own promotion does.
        engines = EngineSet(
            settings.engine_base_urls,
            discover=settings.engine_discovery == "dns",
            client_factory=lambda url: EngineClient(url, settings.engine_timeouts),
        )
        await engines.reconcile([], wait=settings.engine_admin_timeout_s)
        try:
            await promotion.promote(
                promotion.single(conn),
                engines.reachable(),
                candidate,
                "gate (auto mode)",
                evaluation_id=evaluation_id,
                reason="passed the gate",
                lock_timeout_s=settings.promotion_lock_timeout_s,
            )
        except promotion.PromotionError as exc:
            log.error("auto promotion of %s failed: %s", candidate.sha256, exc)
            await conn.execute(
                "UPDATE evaluations SET error = %s WHERE id = %s",
                (f"auto promotion failed: {exc}", evaluation_id),
            )
        finally:
            await engines.aclose()
