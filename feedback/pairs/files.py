"""A snapshot's files: parquet in TRL's conversational formats, hashed and verified.

Preference files hold `prompt` (messages), `chosen` and `rejected` (one assistant
message each), plus `id` and `rule`; KTO files hold `prompt`, `completion` and
`label`. Files are written to a temporary directory and renamed into place.
"""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, Features, List, Value

from feedback.errors import SnapshotCorrupted
from ratchet.hashing import sha256_file

SPLITS = ("train", "test")
MESSAGES = List({"role": Value("string"), "content": Value("string")})
# Explicit, so that an empty split still has its columns and types.
PAIR_FEATURES = Features(
    {
        "id": Value("string"),
        "rule": Value("string"),
        "prompt": MESSAGES,
        "chosen": MESSAGES,
        "rejected": MESSAGES,
    }
)
KTO_FEATURES = Features({"prompt": MESSAGES, "completion": MESSAGES, "label": Value("bool")})


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def pair_records(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {
        "id": [r["id"] for r in rows],
        "rule": [r["rule"] for r in rows],
        "prompt": [r["prompt"] for r in rows],
        "chosen": [assistant(r["chosen"]) for r in rows],
        "rejected": [assistant(r["rejected"]) for r in rows],
    }


def kto_records(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {
        "prompt": [r["prompt"] for r in rows],
        "completion": [assistant(r["completion"]) for r in rows],
        "label": [r["label"] for r in rows],
    }


def write(
    target: Path, pairs: dict[str, list[dict[str, Any]]], kto: dict[str, list[dict[str, Any]]]
) -> dict[str, str]:
    """Write the four parquet files into `target` atomically; return {file: sha256}."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for split in SPLITS:
            _to_parquet(pair_records(pairs[split]), PAIR_FEATURES, tmp / f"pairs-{split}.parquet")
            _to_parquet(kto_records(kto[split]), KTO_FEATURES, tmp / f"kto-{split}.parquet")
        hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        tmp.chmod(0o755)
        if target.exists():  # left by a build whose id the sequence gave out and lost
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hashes


def _to_parquet(columns: dict[str, list[Any]], features: Features, path: Path) -> None:
    # pyarrow converts the nested columns in C++; Dataset.from_dict would encode every
    # example in Python (7 s on 170k pairs). The schema carries the HF features, so
    # datasets reads the files back with the same types.
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    pq.write_table(table, path)


def verify(path: Path, files: dict[str, str]) -> None:
    """Raise SnapshotCorrupted when a file is missing or its bytes changed."""
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise SnapshotCorrupted(f"snapshot file {file} is missing")
        if sha256_file(file) != expected:
            raise SnapshotCorrupted(
                f"snapshot file {file} was altered: sha256 {sha256_file(file)[:12]}…, "
                f"recorded {expected[:12]}…"
            )


def load(path: Path, files: dict[str, str], kind: str = "pairs") -> DatasetDict:
    """The snapshot's `pairs` or `kto` data as train/test splits, after verification."""
    verify(path, files)
    # Read with pyarrow: `Dataset.from_parquet` refuses empty files and fills the cache.
    return DatasetDict({s: Dataset(pq.read_table(path / f"{kind}-{s}.parquet")) for s in SPLITS})
