"""Runtime adapters: a perturbed LoRA registered as `candidate` changes greedy answers,
is loaded under its content-addressed name, and needs no engine restart."""

import json
from pathlib import Path

import httpx
import psutil
import pytest

from ratchet.hashing import adapter_sha256
from ratchet.registry import engine_name_for
from tests.helpers import Gateway, auth, counts, make_lora, query, register_adapter

GREEDY = {
    "messages": [{"role": "user", "content": "Name three colors."}],
    "temperature": 0,
    "max_tokens": 24,
}


def engine_pid(gateway: Gateway) -> int:
    children = psutil.Process(gateway.process.pid).children()
    (engine,) = [c for c in children if "vllm.entrypoints" in " ".join(c.cmdline())]
    return int(engine.pid)


def answer(gateway: Gateway, key: str, model: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=auth(key),
        timeout=120,
        json={"model": model, **GREEDY},
    )


@pytest.fixture(scope="module")
def lora_dir(base_model_dir: Path, data_dir: Path) -> Path:
    # The API registers only from under the import root, <data_dir>/imports.
    return make_lora(base_model_dir, data_dir / "imports" / "lora", seed=1)


def test_candidate_answers_differ_from_base_without_restart(
    gateway: Gateway,
    chat_key: tuple[str, str],
    lora_dir: Path,
    database_url: str,
    data_dir: Path,
    ops_key: tuple[str, str],
) -> None:
    pid_before = engine_pid(gateway)
    base = answer(gateway, chat_key[1], "base")
    assert base.status_code == 200
    response = register_adapter(gateway, ops_key[1], lora_dir)
    assert response.status_code == 201, response.text
    adapter = response.json()
    sha = adapter_sha256(lora_dir)
    assert adapter["sha256"] == sha and adapter["status"] == "candidate"
    assert adapter["engine_name"] == engine_name_for(sha)
    assert Path(adapter["path"]) == data_dir / "adapters" / sha
    assert adapter_sha256(Path(adapter["path"])) == sha  # stored copy is byte-identical

    cand = answer(gateway, chat_key[1], "candidate")
    assert cand.status_code == 200, cand.text
    base_text = base.json()["choices"][0]["message"]["content"]
    cand_text = cand.json()["choices"][0]["message"]["content"]
    assert cand_text != base_text
    assert (
        answer(gateway, chat_key[1], "base").json()["choices"][0]["message"]["content"] == base_text
    )  # greedy base is unchanged by the adapter's presence
    assert engine_pid(gateway) == pid_before  # loaded at run time, no restart

    row = query(
        database_url,
        "SELECT * FROM completions WHERE id = %s",
        cand.json()["id"].removeprefix("chatcmpl-"),
    )[0]
    assert row["public_model"] == "candidate"
    assert row["engine_model"] == engine_name_for(sha)
    assert row["adapter_sha256"] == sha and str(row["adapter_id"]) == adapter["id"]
    assert row["output"] == cand_text

    engine_models = httpx.get(gateway.engine_url + "/v1/models").json()["data"]  # type: ignore[operator]
    loaded = {m["id"]: m for m in engine_models}
    assert loaded[engine_name_for(sha)]["parent"]
    listed = httpx.get(gateway.url + "/v1/models", headers=auth(chat_key[1])).json()["data"]
    assert [m["id"] for m in listed] == ["base", "production", "candidate"]


def test_comparison_with_candidate_pits_production_against_it(
    gateway: Gateway, chat_key: tuple[str, str], database_url: str
) -> None:
    assert any(
        a["status"] == "candidate" for a in query(database_url, "SELECT status FROM adapters")
    )
    created = httpx.post(
        gateway.url + "/v1/comparisons", headers=auth(chat_key[1]), json=GREEDY, timeout=120
    )
    assert created.status_code == 200, created.text
    row = query(
        database_url,
        "SELECT completion_a, completion_b FROM comparisons WHERE id = %s",
        created.json()["id"].removeprefix("cmp-"),
    )[0]
    models = query(
        database_url,
        "SELECT id, public_model FROM completions WHERE id IN (%s, %s)",
        row["completion_a"],
        row["completion_b"],
    )
    assert {m["public_model"] for m in models} == {"production", "candidate"}


def test_registering_the_same_adapter_twice_is_409(
    gateway: Gateway, ops_key: tuple[str, str], lora_dir: Path, database_url: str
) -> None:
    before = counts(database_url)
    response = register_adapter(gateway, ops_key[1], lora_dir)
    assert response.status_code == 409 and response.json()["error"]["code"] == "adapter_exists"
    assert counts(database_url) == before


def test_bad_adapters_are_refused_and_leave_nothing(
    gateway: Gateway,
    ops_key: tuple[str, str],
    lora_dir: Path,
    database_url: str,
    data_dir: Path,
) -> None:
    bad = data_dir / "imports" / "bad"
    bad.mkdir(parents=True)
    broken = bad / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    too_big = bad / "rank128"
    too_big.mkdir()
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    (too_big / "adapter_config.json").write_text(json.dumps({**config, "r": 128}))
    (too_big / "adapter_model.safetensors").write_bytes(
        (lora_dir / "adapter_model.safetensors").read_bytes()
    )
    odd = []
    for i, bad_config in enumerate(([1, 2], {**config, "r": 8.0}, {**config, "r": None})):
        path = bad / f"odd{i}"
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps(bad_config))
        (path / "adapter_model.safetensors").write_bytes(b"x")
        odd.append(path)
    stored_before = sorted(p.name for p in (data_dir / "adapters").iterdir())
    before = counts(database_url)
    for path in (bad / "missing", bad, broken, too_big, *odd):
        response = register_adapter(gateway, ops_key[1], path)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_adapter"
    assert counts(database_url) == before
    assert sorted(p.name for p in (data_dir / "adapters").iterdir()) == stored_before
