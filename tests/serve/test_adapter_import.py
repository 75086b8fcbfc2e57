"""POST /v1/admin/adapters registers only from under the import roots, refuses
symlinks and oversized adapters, copies only the adapter's files, readable by all; two
gateways registering the same adapter at once end with one row and intact files."""

import json
import random
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ratchet.hashing import adapter_sha256
from ratchet.registry import COPIED_FILES, TRAINING_CARD, engine_name_for
from tests.helpers import (
    Gateway,
    counts,
    free_port,
    make_lora,
    query,
    register_adapter,
    start_gateway,
)


def fake_adapter(path: Path, weights_bytes: int = 4096) -> Path:
    """Files shaped like a PEFT LoRA; every refusal here comes before an engine sees them."""
    path.mkdir(parents=True)
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    with (path / "adapter_model.safetensors").open("wb") as out:
        out.truncate(weights_bytes)  # sparse: a big file that costs no disk
    return path


def stored_entries(data_dir: Path) -> list[str]:
    adapters = data_dir / "adapters"
    return sorted(p.name for p in adapters.iterdir()) if adapters.exists() else []


def refused(gateway: Gateway, ops: str, path: Path | str, code: str) -> str:
    response = register_adapter(gateway, ops, Path(path))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "path", error
    assert error["type"] == "invalid_request_error"
    return str(error["message"])


@pytest.fixture
def unchanged(database_url: str, data_dir: Path) -> Iterator[None]:
    """Whatever the test refuses writes no row and leaves no file under adapters/."""
    rows, files = counts(database_url), stored_entries(data_dir)
    yield
    assert counts(database_url) == rows
    assert stored_entries(data_dir) == files


@pytest.fixture
def imports(data_dir: Path, request: pytest.FixtureRequest) -> Path:
    """A directory of this test's own under the session gateway's import root."""
    path: Path = data_dir / "imports" / request.node.name
    path.mkdir(parents=True)
    return path


def test_paths_outside_the_import_roots_are_refused_alike(
    gateway: Gateway, ops_key: tuple[str, str], data_dir: Path, imports: Path, unchanged: None
) -> None:
    outside = fake_adapter(data_dir / "outside-adapter")  # a real adapter, beside the root
    messages = {
        refused(gateway, ops_key[1], path, "path_not_allowed")
        for path in (
            outside,
            data_dir / "no-such-dir",
            imports / ".." / ".." / "outside-adapter",  # `..` climbs out of the root
            "../outside-adapter",  # relative paths start at the root
            "/etc",
        )
    }
    # The same words whether the path exists or not: the API is no file-system probe.
    assert len(messages) == 1 and "outside-adapter" not in messages.pop()


def test_symlinks_are_refused(
    gateway: Gateway, ops_key: tuple[str, str], data_dir: Path, imports: Path, unchanged: None
) -> None:
    real = fake_adapter(imports / "real")
    (imports / "linked-dir").symlink_to(real, target_is_directory=True)
    (imports / "to-outside").symlink_to(fake_adapter(data_dir / "elsewhere"))
    (imports / "via").symlink_to(data_dir, target_is_directory=True)
    linked_file = fake_adapter(imports / "linked-file")
    (linked_file / "adapter_model.safetensors").unlink()
    (linked_file / "adapter_model.safetensors").symlink_to(real / "adapter_model.safetensors")
    linked_config = fake_adapter(imports / "linked-config")
    (linked_config / "adapter_config.json").unlink()
    (linked_config / "adapter_config.json").symlink_to("/etc/passwd")
    for path in (
        imports / "linked-dir",
        imports / "to-outside",
        imports / "via" / "elsewhere",  # a symlinked component on the way
        linked_file,
        linked_config,
    ):
        message = refused(gateway, ops_key[1], path, "symlink_not_allowed")
        assert "passwd" not in message and "elsewhere" not in message.replace(str(path), "")


def test_an_adapter_over_the_size_cap_is_refused(
    gateway: Gateway, ops_key: tuple[str, str], imports: Path, unchanged: None
) -> None:
    big = fake_adapter(imports / "big", weights_bytes=(1 << 30) + 1)  # default cap: 1 GiB
    message = refused(gateway, ops_key[1], big, "adapter_too_large")
    assert "adapter_max_bytes" in message


def test_only_the_adapter_files_are_copied_readable_by_all(
    gateway: Gateway,
    ops_key: tuple[str, str],
    base_model_dir: Path,
    imports: Path,
    data_dir: Path,
    database_url: str,
) -> None:
    source = fresh_copy(make_lora(base_model_dir, imports / "trained", seed=31), imports / "lora")
    (source / TRAINING_CARD).write_text('{"run_id": 7}')
    (source / "optimizer.pt").write_bytes(b"o" * 1000)
    (source / "adapter_model.bin").write_bytes(b"a pickle, never copied")
    (source / "checkpoint-5").mkdir()
    (source / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"old")
    for path in source.iterdir():
        path.chmod(0o600 if path.is_file() else 0o700)
    source.chmod(0o700)

    response = register_adapter(gateway, ops_key[1], source)
    assert response.status_code == 201, response.text
    adapter = response.json()
    stored = Path(adapter["path"])
    try:
        assert stored == data_dir / "adapters" / adapter["sha256"]
        assert sorted(p.name for p in stored.iterdir()) == sorted(COPIED_FILES)
        assert adapter["sha256"] == adapter_sha256(source) == adapter_sha256(stored)
        assert (stored / TRAINING_CARD).read_text() == '{"run_id": 7}'
        assert stat.S_IMODE(stored.stat().st_mode) == 0o755
        assert {stat.S_IMODE((stored / n).stat().st_mode) for n in COPIED_FILES} == {0o644}
        assert not [n for n in stored_entries(data_dir) if n.startswith(".")]
    finally:
        retire(gateway, database_url, adapter["sha256"])


def retire(gateway: Gateway, database_url: str, sha: str) -> None:
    """Out of the way of other modules' `candidate`, and out of the engine: it may
    outlive this session's files (a shared development engine)."""
    query(
        database_url, "UPDATE adapters SET status = 'retired' WHERE sha256 = %s RETURNING id", sha
    )
    httpx.post(
        f"{gateway.engine_url}/v1/unload_lora_adapter",
        json={"lora_name": engine_name_for(sha)},
        timeout=60,
    )


@pytest.fixture(scope="module")
def second_gateway(
    gateway: Gateway, gateway_env: dict[str, str], data_dir: Path
) -> Iterator[Gateway]:
    """Another `ratchet serve` on the same database, data dir and engine."""
    assert gateway.engine_url
    env = {**gateway_env, "RATCHET_ENGINE_URL": gateway.engine_url}
    other = start_gateway(env, data_dir / "gateway-2.log", port=free_port())
    yield other
    assert other.stop() == 0, other.log()


def fresh_copy(lora: Path, target: Path) -> Path:
    """The adapter with a config no engine has seen (a random, inert lora_dropout), so
    that each round really loads it: the load is the window where the race is lost."""
    shutil.copytree(lora, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config["lora_dropout"] = random.uniform(0.0, 0.1)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def race(gateways: list[Gateway], ops: str, source: Path) -> list[httpx.Response]:
    """POST the same adapter to each gateway at the same moment."""
    start = threading.Barrier(len(gateways))
    responses: list[httpx.Response] = []

    def post(gw: Gateway) -> None:
        start.wait()
        responses.append(register_adapter(gw, ops, source))

    threads = [threading.Thread(target=post, args=(gw,)) for gw in gateways]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


def test_two_gateways_registering_one_adapter_end_with_one(
    gateway: Gateway,
    second_gateway: Gateway,
    ops_key: tuple[str, str],
    base_model_dir: Path,
    imports: Path,
    data_dir: Path,
    database_url: str,
) -> None:
    trained = make_lora(base_model_dir, imports / "lora", seed=41)
    for i in range(3):
        source = fresh_copy(trained, imports / f"lora-{i}")
        sha = adapter_sha256(source)
        responses = race([gateway, second_gateway], ops_key[1], source)
        try:
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [201, 409], [r.text for r in responses]
            (lost,) = [r for r in responses if r.status_code == 409]
            assert lost.json()["error"]["code"] == "adapter_exists"
            rows = query(database_url, "SELECT path FROM adapters WHERE sha256 = %s", sha)
            assert rows == [{"path": str(data_dir / "adapters" / sha)}]
            assert adapter_sha256(data_dir / "adapters" / sha) == sha  # files intact
            leftovers = [n for n in stored_entries(data_dir) if n.startswith(".")]
            assert leftovers == []  # no .incoming-* or .removing-*
        finally:
            retire(gateway, database_url, sha)
