"""`candidate` is an adapter nobody has evaluated yet: only keys created with the
`candidate` scope (and ops) see and call it; for the others it is an unknown model."""

import random
import uuid
from pathlib import Path

import httpx
import pytest

from tests.helpers import RATCHET, Gateway, auth, make_lora, query, register_adapter

HELLO = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def candidate(
    gateway: Gateway, ops_key: tuple[str, str], base_model_dir: Path, data_dir: Path
) -> str:
    # A seed of its own each run: an engine shared across runs never sees a name again.
    imports = data_dir / "imports" / f"scope-{uuid.uuid4().hex[:8]}"
    lora = make_lora(base_model_dir, imports, seed=random.randrange(1 << 30))
    registered = register_adapter(gateway, ops_key[1], lora)
    assert registered.status_code == 201, registered.text
    return str(registered.json()["sha256"])


def chat(gateway: Gateway, secret: str, model: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=auth(secret),
        json={"model": model, "messages": HELLO, "max_tokens": 4, "temperature": 0},
        timeout=120,
    )


def models(gateway: Gateway, secret: str) -> list[str]:
    listed = httpx.get(gateway.url + "/v1/models", headers=auth(secret), timeout=30)
    assert listed.status_code == 200, listed.text
    return [m["id"] for m in listed.json()["data"]]


@pytest.mark.usefixtures("candidate")
def test_a_plain_chat_key_neither_sees_nor_calls_candidate(
    gateway: Gateway, plain_chat_key: tuple[str, str], database_url: str
) -> None:
    assert models(gateway, plain_chat_key[1]) == ["base", "production"]
    before = query(database_url, "SELECT count(*) AS n FROM completions")[0]["n"]
    refused = chat(gateway, plain_chat_key[1], "candidate")
    unknown = chat(gateway, plain_chat_key[1], "nonexistent")
    assert refused.status_code == unknown.status_code == 404, refused.text
    # Indistinguishable from a name that never existed, apart from the name itself.
    assert refused.json()["error"]["message"] == unknown.json()["error"]["message"].replace(
        "nonexistent", "candidate"
    )
    assert refused.json()["error"]["code"] == "model_not_found"
    assert "candidate" not in refused.json()["error"]["message"].split("Use one of:")[1]
    assert query(database_url, "SELECT count(*) AS n FROM completions")[0]["n"] == before


@pytest.mark.usefixtures("candidate")
def test_scoped_and_ops_keys_call_candidate(
    gateway: Gateway, chat_key: tuple[str, str], ops_key: tuple[str, str]
) -> None:
    assert models(gateway, chat_key[1]) == ["base", "production", "candidate"]
    for secret in (chat_key[1], ops_key[1]):
        answered = chat(gateway, secret, "candidate")
        assert answered.status_code == 200, answered.text


@pytest.mark.usefixtures("candidate")
def test_a_plain_keys_comparisons_never_use_candidate(
    gateway: Gateway, plain_chat_key: tuple[str, str], database_url: str
) -> None:
    made = httpx.post(
        gateway.url + "/v1/comparisons",
        headers=auth(plain_chat_key[1]),
        json={"messages": HELLO, "max_tokens": 4},
        timeout=120,
    )
    assert made.status_code == 200, made.text
    rows = query(
        database_url,
        "SELECT c.public_model FROM comparisons p JOIN completions c"
        " ON c.id IN (p.completion_a, p.completion_b) WHERE p.id = %s",
        made.json()["id"].removeprefix("cmp-"),
    )
    assert sorted(r["public_model"] for r in rows) == ["production", "production"]


def test_keys_create_with_the_candidate_scope_and_limits(gateway_env: dict[str, str]) -> None:
    import subprocess

    created = subprocess.run(
        [str(RATCHET), "keys", "create", "--role", "chat", "--name", "ab-test",
         "--candidate", "--rpm", "30", "--tpm", "9000", "--concurrency", "2"],
        env={**gateway_env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    secret = created.stdout.strip().splitlines()[-1]  # alone on its last line
    assert secret.startswith("rk_")
    row = query(
        gateway_env["DATABASE_URL"],
        "SELECT rpm, tpm, concurrency, scopes FROM api_keys WHERE name = 'ab-test'",
    )[0]
    assert row == {"rpm": 30, "tpm": 9000, "concurrency": 2, "scopes": ["candidate"]}


def test_keys_create_refuses_limits_the_database_cannot_hold(
    gateway_env: dict[str, str],
) -> None:
    import subprocess

    refused = subprocess.run(
        [str(RATCHET), "keys", "create", "--role", "chat", "--name", "too-big",
         "--tpm", str(2**31)],
        env={**gateway_env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--tpm" in refused.stderr and "Traceback" not in refused.stderr
    rows = query(gateway_env["DATABASE_URL"], "SELECT id FROM api_keys WHERE name = 'too-big'")
    assert rows == []
