"""Settings: environment over config file over defaults; `ratchet config` masks secrets."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from ratchet.settings import Settings, mask_url
from tests.helpers import RATCHET


def test_environment_beats_file_beats_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "ratchet.yaml"
    config.write_text("port: 9001\nmax_tokens_cap: 77\nengine_url: http://engine:8000\n")
    monkeypatch.setenv("RATCHET_CONFIG", str(config))
    monkeypatch.setenv("RATCHET_PORT", "9002")
    settings = Settings()
    assert settings.port == 9002  # environment
    assert settings.max_tokens_cap == 77  # file
    assert settings.engine_url == "http://engine:8000"
    assert settings.engine_dtype == "float32"  # default


def test_unknown_keys_in_file_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ratchet.yaml"
    config.write_text("max_token_cap: 5\n")  # a typo must not be ignored silently
    monkeypatch.setenv("RATCHET_CONFIG", str(config))
    with pytest.raises(ValidationError, match="max_token_cap"):
        Settings()


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATCHET_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        Settings()


def test_mask_url() -> None:
    assert mask_url("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert mask_url("postgresql://u@db/x") == "postgresql://u@db/x"
    assert mask_url("host=db password=s3cret dbname=x") == "host=db password=*** dbname=x"
    assert "s3 cret" not in mask_url("password='s3 cret' host=db")
    assert mask_url("host=db sslpassword = 'a b' port=5") == "host=db sslpassword = *** port=5"
    assert mask_url("redis://:pw@cache:6379/0") == "redis://:***@cache:6379/0"
    assert mask_url("http://engine:8000") == "http://engine:8000"
    assert mask_url("https://sk-TOKEN@judge.example/v1") == "https://***@judge.example/v1"
    assert mask_url("redis://user@cache:6379") == "redis://***@cache:6379"
    assert (
        mask_url("postgresql:///x?host=/run&password=pw&sslpassword=k2&sslmode=require")
        == "postgresql:///x?host=/run&password=***&sslpassword=***&sslmode=require"
    )
    # Written unescaped, a password may hold '@' or '/': none of it may show.
    assert (
        mask_url("postgresql://u:p@s/s@h1:5432,h2:5432/x") == "postgresql://u:***@h1:5432,h2:5432/x"
    )
    assert mask_url("https://judge/v1?api_key=k1&model=m") == "https://judge/v1?api_key=***&model=m"


SECRETS = ("hunter2", "engpass", "cachepw", "judgekey", "queryk", "tokensecret", "dsnpw")


def test_cli_config_masks_every_url_and_secret(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": "postgresql://app:hunter2@db/ratchet?sslpassword=dsnpw&sslmode=require",
        "RATCHET_DATA_DIR": str(tmp_path),
        "RATCHET_ENGINE_URLS": "http://vllm:engpass@engine-0:8000,http://engine-1:8000",
        "RATCHET_ENGINE_URL": "http://ops:engpass@engine-9:8000",
        "RATCHET_RATELIMIT_STORAGE": "redis://:cachepw@cache:6379",
        "RATCHET_EVAL__JUDGE_URL": "https://judge.example/v1?api_key=queryk",
        "RATCHET_EVAL__JUDGE_API_KEY": "judgekey",
        "RATCHET_TOKEN_SECRET": "tokensecret",
    }
    out = subprocess.run(
        [RATCHET, "config"], env=env, capture_output=True, text=True, check=True
    ).stdout
    for secret in SECRETS:
        assert secret not in out, secret
    shown = json.loads(out)
    # Masked, not dropped: ops still see where each thing points.
    assert shown["database_url"] == (
        "postgresql://app:***@db/ratchet?sslpassword=***&sslmode=require"
    )
    assert shown["engine_urls"] == ["http://vllm:***@engine-0:8000", "http://engine-1:8000"]
    assert shown["engine_url"] == "http://ops:***@engine-9:8000"
    assert shown["ratelimit_storage"] == "redis://:***@cache:6379"
    assert shown["eval"]["judge_url"] == "https://judge.example/v1?api_key=***"
    assert shown["eval"]["judge_api_key"] == shown["token_secret"] == "**********"


def test_public_dump_masks_a_key_value_dsn() -> None:
    settings = Settings(database_url="host=db user=app password=dsnpw dbname=x")
    assert settings.public_dump()["database_url"] == "host=db user=app password=*** dbname=x"


def test_cli_config_prints_effective_settings_masked(tmp_path: Path) -> None:
    config = tmp_path / "ratchet.yaml"
    config.write_text("max_tokens_cap: 99\n")
    env = {
        **os.environ,
        "DATABASE_URL": "postgresql://app:hunter2@db/ratchet",
        "RATCHET_DATA_DIR": str(tmp_path),
    }
    out = subprocess.run(
        [RATCHET, "--config", str(config), "config"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shown = json.loads(out)
    assert shown["database_url"] == "postgresql://app:***@db/ratchet"
    assert shown["max_tokens_cap"] == 99 and shown["data_dir"] == str(tmp_path)
    assert "hunter2" not in out


def test_cli_reports_invalid_settings(tmp_path: Path) -> None:
    env = {**os.environ, "RATCHET_ENGINE_DTYPE": "int3"}
    result = subprocess.run([RATCHET, "config"], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "engine_dtype" in result.stderr


def test_engine_replicas_from_a_list_or_one_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATCHET_ENGINE_URLS", "http://a:8000, http://b:8000,")
    replicas = Settings()
    assert replicas.engine_base_urls == ["http://a:8000", "http://b:8000"]
    assert replicas.external_engines and replicas.engine_base_url == "http://a:8000"
    config = tmp_path / "ratchet.yaml"
    config.write_text("engine_urls: [http://c:8000, http://d:8000]\n")
    monkeypatch.delenv("RATCHET_ENGINE_URLS")
    monkeypatch.setenv("RATCHET_CONFIG", str(config))
    assert Settings().engine_base_urls == ["http://c:8000", "http://d:8000"]  # a YAML list
    monkeypatch.delenv("RATCHET_CONFIG")
    local = Settings(engine_port=8123)
    assert not local.external_engines  # `serve` starts its own engine
    assert local.engine_base_urls == ["http://127.0.0.1:8123"]


def test_engine_urls_must_be_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATCHET_ENGINE_URLS", "http://a:8000,vllm-1:8000")
    with pytest.raises(ValidationError, match="vllm-1:8000"):
        Settings()
