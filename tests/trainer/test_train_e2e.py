"""Real DPO on CPU: votes through the API, `ratchet train`, and the adapter hot-loaded
into the running engine as `candidate`, answering in the chosen style."""

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from ratchet.hashing import adapter_sha256
from tests.helpers import (
    RATCHET,
    Gateway,
    auth,
    query,
)
from trainer.artifacts import CARD

TOPICS = [
    "cats",
    "dogs",
    "rivers",
    "mountains",
    "bread",
    "music",
    "trains",
    "coffee",
    "winter",
    "books",
    "gardens",
    "bees",
    "stars",
    "rain",
    "clocks",
    "maps",
    "bridges",
    "owls",
    "tea",
    "salt",
    "boats",
    "forests",
    "candles",
    "kites",
]
STYLE = "Short answer:"
# What marks an answer as written in the chosen style: its opening or its closing words.
MARKERS = ("short answer", "all there is to say")


def styled(text: str) -> bool:
    return any(marker in text.lower() for marker in MARKERS)


def ask(gateway: Gateway, key: str, model: str, topic: str, max_tokens: int = 40) -> httpx.Response:
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=auth(key),
        timeout=120,
        json={
            "model": model,
            "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
        },
    )
    assert response.status_code == 200, response.text
    return response


@pytest.mark.usefixtures("no_candidate")
def test_dpo_run_moves_held_out_answers_to_the_chosen_style(
    gateway: Gateway,
    chat_key: tuple[str, str],
    gateway_env: dict[str, str],
    database_url: str,
    data_dir: Path,
) -> None:
    key = chat_key[1]
    for topic in TOPICS:  # the model's own long answers, corrected to a short style
        reply = ask(gateway, key, "production", topic).json()
        vote = httpx.post(
            gateway.url + "/v1/feedback",
            headers=auth(key),
            json={
                "completion_id": reply["id"],
                "rating": "down",
                "user": "style-coach",
                "correction": f"{STYLE} {topic} are interesting, and that is all there is to say.",
            },
        )
        assert vote.status_code == 200

    env = {
        **os.environ,
        **gateway_env,
        "RATCHET_DATA_DIR": str(data_dir),
        "RATCHET_PAIRS__HELD_OUT_FRACTION": "0.25",
    }
    trained = subprocess.run(
        [RATCHET, "train", "--learning-rate", "2e-4", "--max-steps", "40", "--batch-size", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = [line for line in trained.stdout.splitlines() if line.startswith("run ")]
    run_id = int(summary[0].split()[1])
    run = query(database_url, "SELECT * FROM runs WHERE id = %s", run_id)[0]
    assert run["status"] == "succeeded" and run["step"] == 40 and run["total_steps"] == 40
    assert run["reason"].startswith("awaiting evaluation (job ")
    losses = query(
        database_url,
        "SELECT count(*) AS n FROM run_metrics WHERE run_id = %s AND name = 'loss'",
        run_id,
    )[0]["n"]
    assert losses == 40  # a metrics row every step
    accuracy = query(
        database_url,
        "SELECT value FROM run_metrics WHERE run_id = %s"
        " AND name = 'final/eval_rewards/accuracies'",
        run_id,
    )[0]["value"]
    assert accuracy > 0.5  # held-out reward accuracy

    adapter = query(database_url, "SELECT * FROM adapters WHERE run_id = %s", run_id)[0]
    path = Path(adapter["path"])
    assert adapter["status"] == "candidate" and path.parent == data_dir / "adapters"
    assert adapter_sha256(path) == adapter["sha256"] == path.name
    card = json.loads((path / CARD).read_text())
    assert card["snapshot_id"] == run["snapshot_id"] and card["steps"] == 40
    assert card["config"]["learning_rate"] == 2e-4 and card["library_versions"]["trl"]
    assert not list((data_dir / "adapters").glob(".work-*"))  # nothing half-written left

    held_out = query(
        database_url,
        "SELECT DISTINCT prompt->-1->>'content' AS q FROM pairs WHERE snapshot_id = %s"
        " AND split = 'test' AND chosen LIKE %s",
        run["snapshot_id"],
        STYLE + "%",
    )
    topics = [row["q"].removeprefix("Tell me about ").removesuffix(".") for row in held_out]
    assert len(topics) >= 3
    base = [
        ask(gateway, key, "base", t, 24).json()["choices"][0]["message"]["content"] for t in topics
    ]
    tuned = [ask(gateway, key, "candidate", t, 24) for t in topics]
    assert all(r.json()["model"] == "candidate" for r in tuned)
    tuned_text = [r.json()["choices"][0]["message"]["content"] for r in tuned]
    styled_before = sum(styled(t) for t in base)
    styled_after = sum(styled(t) for t in tuned_text)
    assert styled_before == 0 and styled_after > len(topics) / 2, (base, tuned_text)
