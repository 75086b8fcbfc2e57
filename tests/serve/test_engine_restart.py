"""The supervisor restarts a dead engine; meanwhile clients get 503 + Retry-After, and
afterwards the candidate adapter is loaded again on first use."""

import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import Gateway, auth, make_lora, register_adapter
from tests.serve.test_adapters import GREEDY, engine_pid

pytestmark = pytest.mark.disruptive


def test_dead_engine_is_restarted_and_adapters_come_back(
    gateway: Gateway,
    chat_key: tuple[str, str],
    ops_key: tuple[str, str],
    base_model_dir: Path,
    data_dir: Path,
) -> None:
    lora = make_lora(base_model_dir, data_dir / "imports" / "restart-lora", seed=2)
    registered = register_adapter(gateway, ops_key[1], lora)
    assert registered.status_code == 201, registered.text
    chat = {"model": "candidate", **GREEDY}
    before = httpx.post(
        gateway.url + "/v1/chat/completions", json=chat, headers=auth(chat_key[1]), timeout=120
    )
    assert before.status_code == 200

    old_pid = engine_pid(gateway)
    psutil.Process(old_pid).send_signal(signal.SIGKILL)
    psutil.Process(old_pid).wait(timeout=10)

    down = httpx.post(
        gateway.url + "/v1/chat/completions", json=chat, headers=auth(chat_key[1]), timeout=30
    )
    assert down.status_code == 503, down.text
    assert int(down.headers["retry-after"]) > 0
    assert down.json()["error"]["code"] == "engine_unavailable"

    deadline = time.monotonic() + 300
    while httpx.get(gateway.url + "/readyz").status_code != 200:
        assert time.monotonic() < deadline, gateway.log()
        assert gateway.process.poll() is None
        time.sleep(0.2)
    assert engine_pid(gateway) != old_pid

    after = httpx.post(
        gateway.url + "/v1/chat/completions", json=chat, headers=auth(chat_key[1]), timeout=120
    )
    assert after.status_code == 200, after.text
    assert (
        after.json()["choices"][0]["message"]["content"]
        == before.json()["choices"][0]["message"]["content"]
    )  # same adapter, greedy
