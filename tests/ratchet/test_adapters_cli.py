"""`ratchet adapters register` stores the files under their hash and registers a candidate."""

import json
import os
import shutil
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


def test_register_takes_any_path_but_no_symlink(
    lora: Path, gateway_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    """The CLI is run on the machine: a path outside the API's import roots is fine."""
    data = tmp_path / "data"
    env = {**gateway_env, "RATCHET_DATA_DIR": str(data)}
    source = shutil.copytree(lora, tmp_path / "elsewhere" / "lora")
    config = json.loads((source / "adapter_config.json").read_text())
    config["lora_alpha"] += 1  # an adapter of its own (the other test registered `lora`)
    (source / "adapter_config.json").write_text(json.dumps(config))
    assert not source.is_relative_to(data / "imports")
    linked = tmp_path / "linked"
    linked.symlink_to(source, target_is_directory=True)
    refused = run(env, "adapters", "register", str(linked))
    assert refused.returncode == 1 and "symlink" in refused.stderr
    assert not (data / "adapters").exists() or not any((data / "adapters").iterdir())

    sha = adapter_sha256(source)
    accepted = run(env, "adapters", "register", str(source))
    assert accepted.returncode == 0, accepted.stderr
    assert sha in accepted.stdout and adapter_sha256(data / "adapters" / sha) == sha
    query(
        database_url, "UPDATE adapters SET status = 'retired' WHERE sha256 = %s RETURNING id", sha
    )
