"""The whole API fuzzed from its own OpenAPI schema with schemathesis.

A `ratchet serve` of its own (its own database, the session's engine) takes valid
and invalid requests for every operation, with each role's key. Every response must
be under 500; every 4xx from the API must carry OpenAI's error body; and a request
that got a 4xx must not have inserted, changed or deleted a row anywhere. The number
of cases run is printed and written to test-artifacts/fuzz-summary.json.
"""

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from ratchet.keys import Limits
from tests.helpers import ROOT, Gateway, fresh_database, make_key, start_gateway

ARTIFACTS = ROOT / "test-artifacts"
EXAMPLES = 10  # per operation, role and mode: ~1,500 cases in all
# Browser pages answer people in HTML; the OpenAI body is the API's (/v1, /readyz...).
HTML_ROUTES = ("/reports/",)
UNLIMITED = Limits(rpm=1_000_000, tpm=1_000_000_000, concurrency=64)


@pytest.fixture(scope="module")
def fuzz_target(
    gateway: Gateway,
    server_url: str,
    base_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Gateway, str, dict[str, str]]]:
    """A gateway on a database of its own: ops calls may promote, roll back or queue."""
    assert gateway.engine_url
    data = tmp_path_factory.mktemp("fuzz")
    with fresh_database(server_url, "ratchet_fuzz") as database_url:
        secrets = {
            role: make_key(database_url, role, f"fuzz {role}", UNLIMITED, ("candidate",))[1]
            for role in ("chat", "reviewer", "ops")
        }
        env = {
            "DATABASE_URL": database_url,
            "RATCHET_DATA_DIR": str(data),
            "RATCHET_BASE_MODEL": str(base_model_dir),
            "RATCHET_ENGINE_URL": gateway.engine_url,
            # Short answers: the engine's time goes to many cases, not long texts.
            "RATCHET_MAX_TOKENS_CAP": "8",
        }
        target = start_gateway(env, data / "gateway.log")
        try:
            yield target, database_url, secrets
        finally:
            target.stop()


def fingerprints(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """A hash of every row of every table: an insert, an update or a delete changes it.
    `gateways` is left out: its heartbeat updates it every few seconds."""
    tables = [
        r[0]
        for r in conn.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
            " WHERE schemaname = 'public' AND tablename <> 'gateways' ORDER BY 1"
        ).fetchall()
    ]
    union = " UNION ALL ".join(
        f"SELECT '{t}', md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) FROM {t} x"
        for t in tables
    )
    return dict(conn.execute(union).fetchall())


class Tally:
    def __init__(self) -> None:
        self.cases = 0
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []


def check(case: Any, response: requests.Response, wrote: list[str], tally: Tally) -> None:
    status = response.status_code
    tally.cases += 1
    tally.statuses[status] += 1
    where = f"{case.method} {case.formatted_path} -> {status}"
    if status >= 500:
        tally.failures.append(f"{where}: server error {response.text[:300]}")
        return
    if status < 400:
        return
    if wrote:
        tally.failures.append(f"{where}: a refused request changed rows of {wrote}")
    if case.formatted_path.startswith(HTML_ROUTES):
        return
    try:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
        assert {"param", "code"} <= error.keys()
    except Exception:  # noqa: BLE001 - any shape other than OpenAI's is the failure
        tally.failures.append(f"{where}: not an OpenAI error body: {response.text[:300]}")


def run_operation(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    secret: str,
    conn: psycopg.Connection[Any],
    tally: Tally,
) -> None:
    session = requests.Session()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        before = fingerprints(conn)
        response = case.call(
            base_url=base_url,
            session=session,
            headers={"Authorization": f"Bearer {secret}"},
            timeout=120,
        )
        wrote: list[str] = []
        if response.status_code >= 400:  # only a refusal must have written nothing
            after = fingerprints(conn)
            wrote = [t for t in after if after[t] != before.get(t)]
        check(case, response, wrote, tally)

    fuzz()


@pytest.mark.timeout(1800)
def test_fuzzing_the_api_finds_no_server_error_and_no_partial_write(
    fuzz_target: tuple[Gateway, str, dict[str, str]],
) -> None:
    target, database_url, secrets = fuzz_target
    raw = httpx.get(target.url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    tally = Tally()
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 20, [o.label for o in operations]
    with psycopg.connect(database_url, autocommit=True) as conn:
        for operation in operations:
            for role, secret in secrets.items():
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    try:
                        run_operation(operation, mode, target.url, secret, conn, tally)
                    except Unsatisfiable:
                        continue  # no invalid request exists (an operation without inputs)
                    except Exception as exc:  # noqa: BLE001 - e.g. an unsatisfiable schema
                        tally.failures.append(f"{operation.label} {role} {mode}: {exc!r}")
    summary = {
        "operations": len(operations),
        "cases": tally.cases,
        "statuses": dict(sorted(tally.statuses.items())),
        "failures": len(tally.failures),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "fuzz-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (ARTIFACTS / "fuzz-failures.txt").write_text("\n".join(tally.failures) + "\n")
    print(f"\nschemathesis: {json.dumps(summary)}")
    assert not tally.failures, "\n".join(tally.failures[:40])
    assert tally.cases >= 20 * EXAMPLES * 3
    assert not any(s >= 500 for s in tally.statuses)
    assert any(200 <= s < 300 for s in tally.statuses)  # valid requests got through too
