"""Session fixtures: a fresh database on the real Postgres, the prepared base model,
and one supervised `ratchet serve` (real vLLM CPU engine) shared by the suite."""

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratchet.model import MANIFEST, prepare_default
from ratchet.settings import Settings
from tests.helpers import (
    ROOT,
    Engine,
    Gateway,
    fresh_database,
    make_key,
    query,
    start_gateway,
)

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "leaves_a_replica_dead: kills an engine of the pair; runs after the others"
    )


def run_order(item: pytest.Item) -> tuple[bool, bool, bool, bool]:
    """Tests that restart the shared engine run last, so the others never wait on it.
    Of those, the ones on the two engines of their own come last, the chaos package's
    together (its fixtures are set up once), and one that leaves an engine dead at the
    very end: nobody has to wait for that engine to come back."""
    uses_pair = "engine_processes" in getattr(item, "fixturenames", ())
    return (
        item.get_closest_marker("disruptive") is not None,
        uses_pair,
        uses_pair and "chaos" in item.path.parts,
        item.get_closest_marker("leaves_a_replica_dead") is not None,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=run_order)


@pytest.fixture(scope="session")
def server_url() -> str:
    return os.environ.get("DATABASE_URL", DEFAULT_URL)


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A database of our own on the configured server, migrated, dropped at the end."""
    with fresh_database(server_url) as url:
        yield url


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The default base, prepared once into the repo's data dir (as `make run` does)."""
    target = ROOT / "data" / "models" / "SmolLM2-135M-Instruct"
    prepare_default(target)
    assert (target / MANIFEST).is_file()
    return target


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ratchet-data")


@pytest.fixture(scope="session")
def gateway_env(database_url: str, base_model_dir: Path, data_dir: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "RATCHET_DATA_DIR": str(data_dir),
        "RATCHET_BASE_MODEL": str(base_model_dir),
        "RATCHET_MAX_TOKENS_CAP": "256",
    }


@pytest.fixture(scope="session")
def gateway(gateway_env: dict[str, str], data_dir: Path) -> Iterator[Gateway]:
    """`ratchet serve` supervising the real vLLM engine; started once per session."""
    from tests.helpers import free_port

    shared = os.environ.get("RATCHET_TEST_ENGINE_URL")
    if shared:
        # A development shortcut: several test runs at once share one running engine
        # (never set in CI; the disruptive tests restart the gateway's own engine).
        env = {**gateway_env, "RATCHET_ENGINE_URL": shared}
        gw = start_gateway(env, data_dir / "gateway.log")
        gw.engine_url = shared
    else:
        engine_port = free_port()
        env = {**gateway_env, "RATCHET_ENGINE_PORT": str(engine_port)}
        gw = start_gateway(env, data_dir / "gateway.log")
        gw.engine_url = f"http://127.0.0.1:{engine_port}"
    yield gw
    assert gw.stop() == 0, gw.log()


@pytest.fixture(scope="session")
def chat_key(database_url: str) -> tuple[str, str]:
    """A product's key that runs A/B tests: it may call `candidate`."""
    return make_key(database_url, "chat", scopes=("candidate",))


@pytest.fixture(scope="session")
def plain_chat_key(database_url: str) -> tuple[str, str]:
    """A chat key with no extra scope: `candidate` does not exist for it."""
    return make_key(database_url, "chat", "plain")


@pytest.fixture(scope="session")
def ops_key(database_url: str) -> tuple[str, str]:
    return make_key(database_url, "ops")


@pytest.fixture(scope="session")
def reviewer_key(database_url: str) -> tuple[str, str]:
    return make_key(database_url, "reviewer")


@pytest.fixture
def no_candidate(database_url: str) -> None:
    """Retire every adapter still on its way to production (other modules register some)."""
    retired = query(
        database_url,
        "UPDATE adapters SET status = 'retired' WHERE status <> 'retired' RETURNING id",
    )
    if retired:
        time.sleep(Settings().registry_cache_seconds + 0.2)  # let gateways' caches expire


@pytest.fixture
def engine_pair(engine_processes: list[Engine]) -> list[Engine]:
    """Both engines of the pair, up and healthy."""
    for engine in engine_processes:
        engine.wait_healthy()
    return engine_processes


@pytest.fixture
def engine_processes(engine_launch: list[Engine]) -> list[Engine]:
    """The pair's processes, each running (one a test before left dead is started again),
    not necessarily healthy yet."""
    for engine in engine_launch:
        if not engine.alive():
            engine.start()
    return engine_launch


@pytest.fixture(scope="session")
def engine_launch(
    base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Engine]]:
    """Two vLLM engines of the tests' own, for the replica and chaos tests (which run
    last, one after the other), started but maybe not healthy yet (`engine_pair` waits
    for them), so that a test's own set-up runs while they come up. A test may leave one
    dead (killed to see what follows); it is started again only if a later test needs it.

    Two engines on one box get a core each, as vLLM's CPU docs advise. Left to
    auto-binding, both pin their workers to the same core, and the one that is
    starting gets no time from the one that is serving (8+ minutes to come up)."""
    logs = tmp_path_factory.mktemp("engines")
    cores = os.cpu_count() or 1
    pair = [Engine(base_model_dir, logs / f"engine-{i}.log", core=i % cores) for i in range(2)]
    try:
        for engine in pair:
            engine.start()
        yield pair
    finally:
        for engine in pair:
            if engine.alive():
                engine.thaw()
                engine.kill()
