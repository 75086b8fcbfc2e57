"""KTO and ORPO train for real (a few steps on CPU); QLoRA is refused without CUDA."""

import json
import os
import subprocess
from pathlib import Path

import psycopg
import pytest
from datasets import Dataset, DatasetDict

from ratchet.config import TrainConfig
from tests.feedback import factories as f
from tests.helpers import RATCHET, query
from trainer.errors import InvalidTrainConfig
from trainer.train import train

PROMPT = [{"role": "user", "content": "Tell me about tea."}]
SHORT = [{"role": "assistant", "content": "Short answer: tea is good."}]
LONG = [{"role": "assistant", "content": "Well, tea is a long story with many chapters."}]


def pairs() -> DatasetDict:
    rows = Dataset.from_list([{"prompt": PROMPT, "chosen": SHORT, "rejected": LONG}] * 8)
    return DatasetDict(train=rows, test=rows.select(range(2)))


def kto_rows() -> DatasetDict:
    rows = Dataset.from_list(
        [
            {"prompt": PROMPT, "completion": SHORT if i % 2 else LONG, "label": bool(i % 2)}
            for i in range(8)
        ]
    )
    return DatasetDict(train=rows, test=rows.select(range(2)))


@pytest.mark.parametrize(
    ("algorithm", "data", "metric"),
    [
        ("orpo", pairs, "eval_log_odds_ratio"),
        ("kto", kto_rows, "eval_kl"),
    ],
)
def test_algorithm_trains_a_lora(
    algorithm: str, data: object, metric: str, base_model_dir: Path, tmp_path: Path
) -> None:
    config = TrainConfig(algorithm=algorithm, max_steps=2, batch_size=2)
    result = train(str(base_model_dir), data(), config, tmp_path)  # type: ignore[operator]
    assert result.steps == 2 and metric in result.eval_metrics
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == 16 and set(saved["target_modules"]) == set(config.target_modules)


def test_qlora_needs_cuda(base_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidTrainConfig, match="CUDA"):
        train(str(base_model_dir), pairs(), TrainConfig(qlora=True, max_steps=1), tmp_path)


def test_kto_run_from_a_snapshot(
    database_url: str, gateway_env: dict[str, str], data_dir: Path
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:  # one-sided, unpaired votes
        for i in range(12):
            answer = f.answer(conn, f"kto question {i}", f"an answer, number {i}" + f.LONG)
            f.vote(conn, answer, 1 if i % 2 else -1, user="kto")
    env = {**os.environ, **gateway_env, "RATCHET_DATA_DIR": str(data_dir)}
    done = subprocess.run(
        [
            RATCHET,
            "train",
            "--algorithm",
            "kto",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--min-pairs",
            "4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = query(database_url, "SELECT * FROM runs ORDER BY id DESC LIMIT 1")[0]
    assert run["status"] == "succeeded" and run["params"]["config"]["algorithm"] == "kto"
