from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ratchet.settings import Settings
from serve.app import create_app
from tests.helpers import Gateway, counts


@pytest.fixture(scope="module")
def settings(database_url: str, base_model_dir: Path, data_dir: Path) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=data_dir,
        base_model=str(base_model_dir),
        max_tokens_cap=64,
        max_body_bytes=4096,
        auth_cache_seconds=0,
    )


@pytest.fixture(scope="module")
def app_client(settings: Settings, gateway: Gateway) -> Iterator[TestClient]:
    """The gateway app in-process, on the shared engine, with small caps for bad input."""
    assert settings.database_url
    app = create_app(settings, settings.database_url, engine_url=gateway.engine_url)
    with TestClient(app) as client:
        yield client


@pytest.fixture
def unchanged(database_url: str) -> Iterator[None]:
    """The test's requests are all refused: no row may be written."""
    before = counts(database_url)
    yield
    assert counts(database_url) == before
