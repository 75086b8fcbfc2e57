"""Answers and votes through the real API, then `ratchet data build`; the TRL export
passes TRL's own format checks with the SmolLM2 tokenizer."""

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer
from trl.data_utils import is_conversational, maybe_apply_chat_template

from tests.helpers import RATCHET, Gateway, auth, query

QUESTIONS = [
    f"In two sentences, why is the sky {c}?" for c in ("blue", "dark at night", "red at dusk")
]


def chat(gateway: Gateway, key: str, question: str) -> dict[str, object]:
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=auth(key),
        timeout=120,
        json={
            "model": "production",
            "max_tokens": 40,
            "temperature": 1.0,
            "messages": [{"role": "user", "content": question}],
            "user": "e2e",  # the end user who then votes on it
        },
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.usefixtures("no_candidate")
def test_votes_through_the_api_become_a_trl_dataset(
    gateway: Gateway,
    chat_key: tuple[str, str],
    gateway_env: dict[str, str],
    database_url: str,
    base_model_dir: Path,
    tmp_path: Path,
) -> None:
    key = chat_key[1]
    asked = [question for question in QUESTIONS for _ in range(2)]
    with ThreadPoolExecutor(len(asked)) as pool:  # the engine batches them
        replies = list(pool.map(lambda question: chat(gateway, key, question), asked))
    for up, down in zip(replies[::2], replies[1::2], strict=True):
        for reply, body in (
            (up, {"rating": "up"}),
            (
                down,
                {
                    "rating": "down",
                    "correction": "The short answer is "
                    "light scattering, which favours some colours over others.",
                },
            ),
        ):
            vote = httpx.post(
                gateway.url + "/v1/feedback",
                headers=auth(key),
                json={"completion_id": reply["id"], "user": "e2e", **body},
            )
            assert vote.status_code == 200, vote.text
    compared = httpx.post(
        gateway.url + "/v1/comparisons",
        headers=auth(key),
        timeout=120,
        json={
            "messages": [{"role": "user", "content": QUESTIONS[0]}],
            "max_tokens": 40,
            "temperature": 1.0,
        },
    )
    choice = httpx.post(
        f"{gateway.url}/v1/comparisons/{compared.json()['id']}/choice",
        headers=auth(key),
        json={"choice": "a"},
    )
    assert choice.status_code == 200

    env = {**os.environ, **gateway_env, "RATCHET_DATA_DIR": str(tmp_path)}
    built = subprocess.run(
        [RATCHET, "data", "build"], env=env, capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stderr
    snapshot_id = int(built.stdout.splitlines()[-1])
    ours = query(
        database_url,
        "SELECT p.rule, count(*) AS n FROM pairs p WHERE p.snapshot_id = %s"
        " AND p.prompt->-1->>'content' = ANY(%s) GROUP BY p.rule",
        snapshot_id,
        QUESTIONS,
    )
    found = {r["rule"]: r["n"] for r in ours}
    assert found.get("correction", 0) + found.get("thumbs", 0) >= len(QUESTIONS)
    sources = query(
        database_url,
        "SELECT count(*) AS n FROM pair_sources s, unnest(s.vote_ids) AS u (vote_id)"
        " JOIN votes v ON v.id = u.vote_id WHERE s.snapshot_id = %s AND v.end_user = 'e2e'",
        snapshot_id,
    )
    assert sources[0]["n"] >= len(QUESTIONS)

    out = tmp_path / "trl"
    exported = subprocess.run(
        [RATCHET, "data", "export", str(snapshot_id), "--format", "trl", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert exported.returncode == 0, exported.stderr
    data = load_from_disk(str(out))
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    rows = [row for split in ("train", "test") for row in data[split]]
    assert rows
    for row in rows:
        assert is_conversational(row)
        templated = maybe_apply_chat_template(row, tokenizer)
        assert templated["prompt"].rstrip().endswith("assistant")  # generation prompt added
        assert templated["chosen"] and templated["rejected"]
        assert row["chosen"][0]["content"] in templated["chosen"]
