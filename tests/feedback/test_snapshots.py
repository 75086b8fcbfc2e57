"""Snapshots: immutable, reproducible, verified on read; exports; the data CLI and API."""

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from datasets import load_from_disk
from fastapi.testclient import TestClient

from feedback.errors import NotEnoughPairs, SnapshotCorrupted
from feedback.pairs.build import build
from feedback.pairs.export import export
from ratchet.config import PairSettings
from ratchet.settings import Settings
from serve.app import create_app
from tests.feedback import factories as f
from tests.helpers import RATCHET, auth, free_port, make_key


def some_votes(db: psycopg.Connection[Any], n: int = 12) -> None:
    for i in range(n):
        good = f.answer(db, f"question {i}", f"good answer {i}" + f.LONG)
        bad = f.answer(db, f"question {i}", f"bad answer {i}" + f.LONG)
        f.vote(db, good, 1)
        f.vote(db, bad, -1, correction=f"fixed answer {i}" + f.LONG)


def snapshot_rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM snapshots").fetchone()
    return int(row[0]) if row else 0


def test_same_state_same_hash_and_files_load(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    some_votes(db)
    first = build(pairs_url, PairSettings(), tmp_path)
    second = build(pairs_url, PairSettings(), tmp_path)
    assert second.id != first.id and first.content_sha256 == second.content_sha256
    assert first.files == second.files  # byte-identical parquet
    data = first.load()
    assert data["train"].num_rows + data["test"].num_rows == sum(first.counts["pairs"].values())
    assert first.counts["pairs"] == {"choice": 0, "correction": 12, "thumbs": 12}
    row = data["train"][0]
    assert row["chosen"][0]["role"] == "assistant" and row["prompt"][-1]["role"] == "user"
    f.vote(db, f.answer(db, "question 0", "another bad one" + f.LONG), -1)
    third = build(pairs_url, PairSettings(), tmp_path)
    assert third.content_sha256 != first.content_sha256


def test_altered_or_missing_files_are_detected(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    some_votes(db)
    snapshot = build(pairs_url, PairSettings(), tmp_path)
    train = Path(snapshot.path) / "pairs-train.parquet"
    train.write_bytes(train.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(SnapshotCorrupted, match="altered"):
        snapshot.load()
    train.unlink()
    with pytest.raises(SnapshotCorrupted, match="missing"):
        snapshot.load()


@pytest.mark.parametrize("seed_votes", [False, True])
def test_too_few_pairs_writes_nothing(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path, seed_votes: bool
) -> None:
    if seed_votes:
        some_votes(db, n=2)
    with pytest.raises(NotEnoughPairs) as caught:
        build(pairs_url, PairSettings(), tmp_path / "snapshots", min_pairs=500)
    assert caught.value.found == (4 if seed_votes else 0)
    assert "need 500" in str(caught.value) and "'votes'" in str(caught.value)
    assert snapshot_rows(pairs_url) == 0
    assert not (tmp_path / "snapshots").exists() or not any((tmp_path / "snapshots").iterdir())


def test_exports(db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path) -> None:
    some_votes(db)
    snapshot = build(pairs_url, PairSettings(held_out_fraction=0.3), tmp_path)
    trl = load_from_disk(str(export(snapshot, "trl", tmp_path / "trl")))
    assert set(trl) == {"train", "test"} and trl["test"].num_rows > 0
    assert trl["train"].column_names == ["prompt", "chosen", "rejected"]
    axolotl = load_from_disk(str(export(snapshot, "axolotl", tmp_path / "axolotl")))
    assert axolotl["train"].column_names == ["conversation", "chosen", "rejected"]
    first = axolotl["train"][0]
    assert first["chosen"]["role"] == "assistant" and first["conversation"][-1]["role"] == "user"
    lines = export(snapshot, "jsonl", tmp_path / "pairs.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == trl["train"].num_rows + trl["test"].num_rows
    assert {r["split"] for r in records} == {"train", "test"}
    assert all(isinstance(r["chosen"], str) and r["prompt"] for r in records)
    with pytest.raises(Exception, match="already exists"):
        export(snapshot, "jsonl", tmp_path / "pairs.jsonl")


def cli(url: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, "RATCHET_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    return subprocess.run(
        [RATCHET, "data", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_build_stats_export(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    some_votes(db, n=3)
    refused = cli(pairs_url, tmp_path, "build", "--min-pairs", "100")
    assert refused.returncode == 1 and "only 6 preference pairs (need 100)" in refused.stderr
    assert snapshot_rows(pairs_url) == 0
    stats = cli(pairs_url, tmp_path, "stats")
    assert stats.returncode == 0, stats.stderr
    assert "correction" in stats.stdout and "since ever" in stats.stdout
    built = cli(pairs_url, tmp_path, "build", "--min-pairs", "6")
    assert built.returncode == 0, built.stderr
    snapshot_id = built.stdout.splitlines()[-1]
    assert snapshot_id.isdigit()
    out = tmp_path / "export"
    exported = cli(pairs_url, tmp_path, "export", snapshot_id, "--format", "trl", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert (
        load_from_disk(str(out))["train"].num_rows + load_from_disk(str(out))["test"].num_rows == 6
    )
    missing = cli(
        pairs_url, tmp_path, "export", "999999", "--format", "trl", "--out", str(tmp_path / "x")
    )
    assert missing.returncode == 1 and "no snapshot with id 999999" in missing.stderr
    bad = cli(pairs_url, tmp_path, "export", snapshot_id, "--format", "csv", "--out", "x")
    assert bad.returncode == 2
    assert f"since snapshot {snapshot_id}" in cli(pairs_url, tmp_path, "stats").stdout


def test_admin_dataset_endpoints(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path, base_model_dir: Path
) -> None:
    some_votes(db, n=3)
    snapshot = build(pairs_url, PairSettings(), tmp_path)
    settings = Settings(database_url=pairs_url, data_dir=tmp_path, base_model=str(base_model_dir))
    _, ops = make_key(pairs_url, "ops")
    _, chat = make_key(pairs_url, "chat")
    app = create_app(settings, pairs_url, engine_url=f"http://127.0.0.1:{free_port()}")
    with TestClient(app) as client:
        listed = client.get("/v1/admin/datasets", headers=auth(ops))
        assert listed.status_code == 200, listed.text
        body = listed.json()
        assert [s["id"] for s in body["data"]] == [snapshot.id]
        assert body["stats"]["last_snapshot_id"] == snapshot.id
        assert body["stats"]["would_yield"]["pairs"]["correction"] == 3
        one = client.get(f"/v1/admin/datasets/{snapshot.id}", headers=auth(ops))
        assert one.status_code == 200 and one.json()["content_sha256"] == snapshot.content_sha256
        missing = client.get("/v1/admin/datasets/424242", headers=auth(ops))
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "snapshot_not_found"
        assert client.get("/v1/admin/datasets", headers=auth(chat)).status_code == 403


def test_exports_with_an_empty_split_load(
    db: psycopg.Connection[Any], pairs_url: str, tmp_path: Path
) -> None:
    some_votes(db, n=2)
    snapshot = build(pairs_url, PairSettings(held_out_fraction=0.0), tmp_path)
    for fmt in ("trl", "axolotl"):
        data = load_from_disk(str(export(snapshot, fmt, tmp_path / fmt)))
        assert data["test"].num_rows == 0 and data["train"].num_rows == 4
