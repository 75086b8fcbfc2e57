"""The whole loop on real parts, and the honest gate.

Votes through the API -> snapshot -> DPO training -> the evaluation job -> a report
-> approved in a real browser -> production answers from the new adapter -> rollback
-> production answers as before. From the same snapshot, an adapter trained with
chosen and rejected swapped must fail the gate, with reasons naming the criteria.
"""

import asyncio
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from ratchet import registry
from ratchet.hashing import adapter_sha256
from ratchet.registry import TRAINING_CARD as CARD
from ratchet.settings import Settings
from tests.browser import CHROMIUM_ARGS, chromium
from tests.helpers import RATCHET, ROOT, Gateway, auth, query

# 32 prompts, 40% held out: 19 train the adapter, and 13 are the held-out pairs of the
# preference test and of the greedy diff (with the 32 regression prompts, 45 diffs).
TOPICS = [
    "cats", "dogs", "rivers", "mountains", "bread", "music", "trains", "coffee", "winter",
    "books", "gardens", "bees", "stars", "rain", "clocks", "maps", "bridges", "owls",
    "tea", "salt", "boats", "forests", "candles", "kites", "volcanoes", "apples",
    "bicycles", "deserts", "lighthouses", "snow", "frogs", "castles",
]  # fmt: skip
STYLE = "Short answer:"
# What marks an answer as written in the chosen style: its opening or its closing words.
MARKERS = ("short answer", "all there is to say")
# 10 steps at 5e-4 move 12 of 13 held-out greedy answers to the chosen style (16 steps
# moved all; 40 at 2e-4 did the same in 4 times the time).
STEPS = 10
TRAIN = ["--learning-rate", "5e-4", "--max-steps", str(STEPS), "--batch-size", "4"]
# Per offline benchmark (the default is 300; 10 is the least the settings allow). Here
# they check the wiring (every task scored, per item, for every model); what passes or
# fails these adapters is held-out preference, over the snapshot's own pairs.
ITEMS = 10
# Two trainings and three models scored: longer than the suite's per-test limit.
pytestmark = pytest.mark.timeout(2700)
ARTIFACTS = Path(os.environ.get("RATCHET_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def styled(text: str) -> bool:
    return any(marker in text.lower() for marker in MARKERS)


def ask(gateway: Gateway, key: str, model: str, topic: str, max_tokens: int = 24) -> str:
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=auth(key),
        timeout=300,
        json={
            "model": model,
            "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model
    return str(body["choices"][0]["message"]["content"])


def run(
    args: list[str], env: dict[str, str], timeout: int = 1500
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [RATCHET, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.fixture(scope="module")
def env(gateway_env: dict[str, str], gateway: Gateway, data_dir: Path) -> dict[str, str]:
    assert gateway.engine_url
    return {
        **os.environ,
        **gateway_env,
        "RATCHET_DATA_DIR": str(data_dir),
        "RATCHET_ENGINE_URL": gateway.engine_url,
        "RATCHET_PAIRS__HELD_OUT_FRACTION": "0.4",
        "RATCHET_EVAL__ITEMS": str(ITEMS),
        # The chosen style shows in its opening words; 128 by default.
        "RATCHET_EVAL__DIFF_MAX_TOKENS": "16",
    }


@pytest.fixture(scope="module")
def loop(
    gateway: Gateway,
    chat_key: tuple[str, str],
    env: dict[str, str],
    database_url: str,
) -> dict[str, Any]:
    """Votes through the API, `ratchet train`, and the queued evaluation run by a worker."""
    with psycopg.connect(database_url, autocommit=True) as conn:  # no candidate from others
        conn.execute("UPDATE adapters SET status = 'retired' WHERE status <> 'retired'")
    time.sleep(Settings().registry_cache_seconds + 0.2)
    key = chat_key[1]

    def vote(topic: str) -> None:
        reply = httpx.post(
            gateway.url + "/v1/chat/completions",
            headers=auth(key),
            timeout=300,
            json={
                "model": "production",
                "temperature": 0,
                # The rejected answers: every training step and log-prob pays for their length.
                "max_tokens": 24,
                "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
                "user": "coach",  # the end user who then votes on it
            },
        ).json()
        correction = f"{STYLE} {topic} are interesting, and that is all there is to say."
        voted = httpx.post(
            gateway.url + "/v1/feedback",
            headers=auth(key),
            json={"completion_id": reply["id"], "rating": "down", "user": "coach",
                  "correction": correction},
        )  # fmt: skip
        assert voted.status_code == 200, voted.text

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(vote, TOPICS))
    trained = run(["train", *TRAIN], env)
    run_id = int(next(ln for ln in trained.stdout.splitlines() if ln.startswith("run ")).split()[1])
    run(["worker", "--once"], env)  # runs the evaluation the training queued
    training = query(database_url, "SELECT * FROM runs WHERE id = %s", run_id)[0]
    adapter = query(database_url, "SELECT * FROM adapters WHERE run_id = %s", run_id)[0]
    evaluations = query(
        database_url, "SELECT * FROM evaluations WHERE adapter_id = %s", adapter["id"]
    )
    return {"run": training, "adapter": adapter, "evaluations": evaluations}


def test_training_produces_a_candidate_with_its_card(loop: dict[str, Any], data_dir: Path) -> None:
    run_row, adapter = loop["run"], loop["adapter"]
    assert run_row["status"] == "succeeded" and run_row["step"] == STEPS
    # Its evaluation was queued, row first: the reason names the row the worker ran.
    assert run_row["reason"] == f"awaiting evaluation {loop['evaluations'][0]['id']}"
    path = Path(adapter["path"])
    assert path.parent == data_dir / "adapters" and adapter_sha256(path) == adapter["sha256"]
    card = json.loads((path / CARD).read_text())
    assert card["snapshot_id"] == run_row["snapshot_id"] and card["steps"] == STEPS
    assert not list((data_dir / "adapters").glob(".work-*"))


def test_the_helpful_adapter_passes_the_gate(loop: dict[str, Any], database_url: str) -> None:
    (evaluation,) = loop["evaluations"]
    assert evaluation["status"] == "succeeded", evaluation["error"]
    report = evaluation["report"]
    assert evaluation["decision"] == "pass", evaluation["reasons"]
    status = query(database_url, "SELECT status FROM adapters WHERE id = %s", loop["adapter"]["id"])
    assert status[0]["status"] == "awaiting_review"  # review mode: a person decides
    tasks = {b["task"]: b for b in report["benchmarks"]}
    assert set(tasks) == {"ratchet_arc_easy", "ratchet_arc_challenge", "ratchet_hellaswag",
                          "ratchet_mmlu"}  # fmt: skip
    assert all(b["n"] == ITEMS for b in tasks.values())
    pref = report["preference"]
    assert pref["n"] >= 10 and pref["candidate"] > pref["production"] and pref["ci_low"] > 0
    assert report["diff_summary"]["n"] >= 40 and len(report["diffs"]) >= 40
    held_out = [d for d in report["diffs"] if d["source"] == "held_out"]
    assert sum(styled(d["candidate"]["text"]) for d in held_out) > len(held_out) / 2
    assert not any(styled(d["production"]["text"]) for d in held_out)
    assert report["training_card"]["run_id"] == loop["run"]["id"]
    assert len([p for p in report["training_curve"] if "loss" in p]) == STEPS
    items = query(
        database_url,
        "SELECT suite, count(*) AS n FROM eval_items WHERE evaluation_id = %s GROUP BY suite",
        evaluation["id"],
    )
    by_suite = {r["suite"]: r["n"] for r in items}
    assert by_suite["preference"] == pref["n"] and by_suite["diff"] == len(report["diffs"])
    assert by_suite["benchmark:ratchet_mmlu"] == ITEMS


@pytest.fixture(scope="module")
def harmful(
    loop: dict[str, Any], env: dict[str, str], base_model_dir: Path, data_dir: Path,
    database_url: str, tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:  # fmt: skip
    """An adapter trained on the same snapshot with chosen and rejected swapped, then
    evaluated with `ratchet eval`."""
    from feedback.pairs import snapshots
    from ratchet.config import TrainConfig
    from trainer.train import train

    snapshot_id = loop["run"]["snapshot_id"]
    with psycopg.connect(database_url) as conn:
        data = snapshots.require(conn, snapshot_id).load("pairs")
    swapped = data.rename_columns({"chosen": "rejected", "rejected": "chosen"})
    # Fewer steps than the helpful one: unlearning the preference takes less.
    config = TrainConfig(learning_rate=5e-4, max_steps=4, batch_size=4)
    result = train(str(base_model_dir), swapped, config, tmp_path_factory.mktemp("swapped"))
    sha, stored = registry.store_files(result.adapter_dir, data_dir / "adapters")

    async def register() -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await registry.register(conn, sha, stored, None, source="test-swapped",
                                    snapshot_id=snapshot_id)  # fmt: skip

    asyncio.run(register())
    # What this gate run must show is the failed preference and how it is reported; the
    # benchmarks' and the diff's wiring is the helpful run's to check, so one task and
    # short greedy answers do here.
    quick = {"RATCHET_EVAL__TASKS": '["ratchet_arc_easy"]', "RATCHET_EVAL__DIFF_MAX_TOKENS": "8"}
    done = run(["eval", sha[:12]], env | quick)
    return {"sha": sha, "summary": json.loads(done.stdout.strip().splitlines()[-1]),
            "stderr": done.stderr}  # fmt: skip


def test_the_swapped_adapter_fails_the_gate_naming_the_criteria(
    harmful: dict[str, Any], env: dict[str, str], database_url: str
) -> None:
    summary = harmful["summary"]
    assert summary["decision"] == "fail", summary
    failed = {reason.split(":")[0] for reason in summary["reasons"]}
    assert "preference" in failed, summary["reasons"]
    assert failed <= {"preference", "benchmark", "flag"}
    evaluation = query(database_url, "SELECT * FROM evaluations WHERE id = %s",
                       summary["evaluation_id"])[0]  # fmt: skip
    pref = evaluation["report"]["preference"]
    # It learned the opposite preference: its implicit reward (log-ratio to the base)
    # ranks rejected above chosen on every held-out pair. An adapter that learned
    # nothing would tie (margin 0), and production ranks none right either.
    scored = query(database_url, "SELECT candidate AS c FROM eval_items WHERE evaluation_id"
                   " = %s AND suite = 'preference'", evaluation["id"])  # fmt: skip
    margins = [
        (r["c"]["chosen"] - r["c"]["base_chosen"]) - (r["c"]["rejected"] - r["c"]["base_rejected"])
        for r in scored
    ]
    assert len(margins) == pref["n"] >= 10 and all(m < 0 for m in margins), margins
    assert pref["candidate"] == 0.0 and pref["ci_high"] <= 0
    assert "✘ preference" in harmful["stderr"]  # progress and verdict for the person at the CLI
    markdown = run(["report", str(summary["evaluation_id"]), "--format", "md"], env).stdout
    assert markdown.startswith(f"# Promotion report {summary['evaluation_id']}: **FAIL**")
    assert "❌ **preference**" in markdown
    as_json = json.loads(run(["report", str(summary["evaluation_id"]), "-f", "json"], env).stdout)
    assert as_json["decision"]["decision"] == "fail"
    page = run(["report", str(summary["evaluation_id"]), "--format", "html"], env).stdout
    assert page.startswith("<!doctype html>") and 'class="decision fail"' in page


def test_the_report_in_a_browser_approve_then_rollback(
    loop: dict[str, Any],
    harmful: dict[str, Any],
    gateway: Gateway,
    chat_key: tuple[str, str],
    reviewer_key: tuple[str, str],
    ops_key: tuple[str, str],
    database_url: str,
) -> None:
    from playwright.sync_api import sync_playwright

    evaluation_id = loop["evaluations"][0]["id"]
    held_out = query(
        database_url,
        "SELECT DISTINCT prompt->-1->>'content' AS q FROM pairs WHERE snapshot_id = %s"
        " AND split = 'test'",
        loop["run"]["snapshot_id"],
    )
    topics = [r["q"].removeprefix("Tell me about ").removesuffix(".") for r in held_out][:6]
    before = [ask(gateway, chat_key[1], "production", t) for t in topics]
    assert not any(styled(t) for t in before)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{gateway.url}/reports/{evaluation_id}")
        # The sign-in form: a server-side session starts, its id (not the key) in a cookie.
        page.fill("#key", reviewer_key[1])
        page.click("#sign-in")
        page.wait_for_selector("#decision")
        assert page.inner_text("#decision") == "PASS"
        assert page.locator("#chart svg rect.bar.candidate").count() == 4
        assert page.locator("#chart svg").is_visible()
        diffs = page.locator("#diffs .diff")
        assert diffs.count() >= 20 and diffs.first.is_visible()
        assert page.locator("#diffs ins").count() > 0  # the changes are highlighted
        assert "preference" in page.inner_text("#criteria")
        page.screenshot(path=str(ARTIFACTS / f"report-{evaluation_id}.png"), full_page=True)
        page.fill("input[name=note]", "shorter answers, as users asked")
        page.click("#approve")
        page.wait_for_selector("#notice")
        assert "Approved" in page.inner_text("#notice")
        assert page.inner_text("#review-status") == "approved"
        assert page.locator("#approve").count() == 0  # decided once
        page.screenshot(path=str(ARTIFACTS / f"report-{evaluation_id}-approved.png"))
        browser.close()
    assert (ARTIFACTS / f"report-{evaluation_id}.png").stat().st_size > 10_000
    row = query(database_url, "SELECT * FROM evaluations WHERE id = %s", evaluation_id)[0]
    assert row["review"] == "approved" and "reviewer" in row["reviewed_by"]
    assert row["review_note"] == "shorter answers, as users asked"

    time.sleep(Settings().registry_cache_seconds + 0.2)
    after = [ask(gateway, chat_key[1], "production", t) for t in topics]
    assert sum(styled(t) for t in after) > len(topics) / 2, after

    refused = httpx.post(gateway.url + "/v1/admin/promotions", headers=auth(ops_key[1]),
                         json={"adapter": harmful["sha"]}, timeout=60)  # fmt: skip
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "gate_failed"
    back = httpx.post(gateway.url + "/v1/admin/rollback", headers=auth(ops_key[1]), timeout=60)
    assert back.status_code == 201 and back.json()["adapter"] is None, back.text
    time.sleep(Settings().registry_cache_seconds + 0.2)
    assert [ask(gateway, chat_key[1], "production", t) for t in topics] == before
