"""Keys and roles: 401 without a valid key, 403 for the wrong role."""

import subprocess

import pytest
from fastapi.testclient import TestClient

from tests.helpers import RATCHET, auth, make_key, query

HELLO: dict[str, object] = {
    "model": "base",
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 4,
}
Endpoint = tuple[str, str, dict[str, object] | None]
CHAT_ENDPOINTS: list[Endpoint] = [
    ("POST", "/v1/chat/completions", HELLO),
    ("GET", "/v1/models", None),
    ("POST", "/v1/feedback", {"completion_id": "chatcmpl-0", "rating": "up"}),
    ("POST", "/v1/comparisons", {"messages": HELLO["messages"], "max_tokens": 4}),
    ("POST", "/v1/comparisons/cmp-0/choice", {"choice": "a"}),
]
OPS_ENDPOINTS: list[Endpoint] = [
    ("GET", "/v1/admin/adapters", None),
    ("POST", "/v1/admin/adapters", {"path": "/nonexistent"}),
]


@pytest.mark.parametrize(("method", "path", "body"), CHAT_ENDPOINTS + OPS_ENDPOINTS)
@pytest.mark.parametrize("header", [None, "Bearer rk_wrong", "Basic abc", "Bearer "])
def test_missing_or_bad_key_is_401(
    app_client: TestClient, method: str, path: str, body: object, header: str | None
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    response = app_client.request(method, path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(("method", "path", "body"), OPS_ENDPOINTS)
@pytest.mark.parametrize("role", ["chat", "reviewer"])
def test_admin_needs_ops(
    app_client: TestClient, database_url: str, method: str, path: str, body: object, role: str
) -> None:
    _, secret = make_key(database_url, role)  # type: ignore[arg-type]
    response = app_client.request(method, path, json=body, headers=auth(secret))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_role"


@pytest.mark.parametrize(("method", "path", "body"), CHAT_ENDPOINTS)
def test_reviewer_may_not_chat_or_vote(
    app_client: TestClient, reviewer_key: tuple[str, str], method: str, path: str, body: object
) -> None:
    response = app_client.request(method, path, json=body, headers=auth(reviewer_key[1]))
    assert response.status_code == 403


def test_ops_may_chat_and_read_admin(app_client: TestClient, ops_key: tuple[str, str]) -> None:
    assert (
        app_client.post("/v1/chat/completions", json=HELLO, headers=auth(ops_key[1])).status_code
        == 200
    )
    assert app_client.get("/v1/admin/adapters", headers=auth(ops_key[1])).status_code == 200


def test_cli_creates_key_alone_on_last_line_and_revokes_it(
    app_client: TestClient, gateway_env: dict[str, str], database_url: str
) -> None:
    env = {"PATH": "/usr/bin:/bin", **gateway_env}
    out = subprocess.run(
        [RATCHET, "keys", "create", "--role", "chat", "--name", "cli"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    secret = out.splitlines()[-1]
    assert secret.startswith("rk_") and " " not in secret
    row = query(database_url, "SELECT id, role, name, key_sha256 FROM api_keys WHERE name = 'cli'")[
        0
    ]
    assert row["role"] == "chat" and secret not in str(row)  # stored hashed only
    assert app_client.get("/v1/models", headers=auth(secret)).status_code == 200
    subprocess.run(
        [RATCHET, "keys", "revoke", str(row["id"])], env=env, check=True, capture_output=True
    )
    assert app_client.get("/v1/models", headers=auth(secret)).status_code == 401  # no cache here
    again = subprocess.run(
        [RATCHET, "keys", "revoke", str(row["id"])], env=env, capture_output=True, text=True
    )
    assert again.returncode == 1 and "no active key" in again.stderr


def test_cli_refuses_unknown_role(gateway_env: dict[str, str]) -> None:
    result = subprocess.run(
        [RATCHET, "keys", "create", "--role", "admin"],
        env={"PATH": "/usr/bin:/bin", **gateway_env},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "chat, reviewer, ops" in result.stderr
