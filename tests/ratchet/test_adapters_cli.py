"""`ratchet adapters register` stores the files under their hash and registers a candidate."""

import os
import subprocess
from pathlib import Path

import pytest

from ratchet.hashing import adapter_sha256
from ratchet.registry import engine_name_for
from tests.helpers import RATCHET, make_lora, query


@pytest.fixture(scope="module")
def lora(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(base_model_dir, tmp_path_factory.mktemp("cli-lora"), seed=3)


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RATCHET, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_register_and_list(
    lora: Path, gateway_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    env = {**gateway_env, "RATCHET_DATA_DIR": str(tmp_path)}
    sha = adapter_sha256(lora)
    first = run(env, "adapters", "register", str(lora))
    assert first.returncode == 0, first.stderr
    assert sha in first.stdout and "candidate" in first.stdout
    assert adapter_sha256(tmp_path / "adapters" / sha) == sha
    again = run(env, "adapters", "register", str(lora))  # idempotent: same row
    assert again.returncode == 0
    rows = query(
        database_url, "SELECT engine_name, status, path FROM adapters WHERE sha256 = %s", sha
    )
    assert rows == [
        {
            "engine_name": engine_name_for(sha),
            "status": "candidate",
            "path": str(tmp_path / "adapters" / sha),
        }
    ]
    listed = run({**env, "COLUMNS": "200"}, "adapters", "list")  # rich wraps narrow tables
    assert engine_name_for(sha) in listed.stdout
    query(
        database_url, "UPDATE adapters SET status = 'retired' WHERE sha256 = %s RETURNING id", sha
    )


def test_register_refuses_a_non_adapter(gateway_env: dict[str, str], tmp_path: Path) -> None:
    result = run(
        {**gateway_env, "RATCHET_DATA_DIR": str(tmp_path)}, "adapters", "register", str(tmp_path)
    )
    assert result.returncode == 1 and "adapter_config.json" in result.stderr
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())
