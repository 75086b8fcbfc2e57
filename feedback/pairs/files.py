"""A snapshot's files: parquet in TRL's conversational formats, hashed and verified.

Preference files hold `prompt` (messages), `chosen` and `rejected` (one assistant
message each), plus `id` and `rule`; KTO files hold `prompt`, `completion` and
`label`. Files are written to a temporary directory and renamed into place.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from feedback.errors import SnapshotCorrupted
from ratchet.hashing import sha256_file

if TYPE_CHECKING:
    from datasets import DatasetDict

SPLITS = ("train", "test")


def _string() -> tuple[pa.DataType, dict[str, Any]]:
    return pa.string(), {"dtype": "string", "_type": "Value"}


def _messages() -> tuple[pa.DataType, dict[str, Any]]:
    role, content = _string(), _string()
    arrow = pa.list_(pa.struct([("role", role[0]), ("content", content[0])]))
    return arrow, {"feature": {"role": role[1], "content": content[1]}, "_type": "List"}


def _schema(columns: dict[str, tuple[pa.DataType, dict[str, Any]]]) -> pa.Schema:
    """An Arrow schema carrying its Hugging Face features, as `Features.arrow_schema`
    makes it (a test keeps the two equal), so that `datasets` reads the files back with
    the same types. Written out here: importing `datasets` costs a build seconds."""
    features = {name: hf for name, (_, hf) in columns.items()}
    return pa.schema(
        [(name, arrow) for name, (arrow, _) in columns.items()],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )


# Explicit, so that an empty split still has its columns and types.
PAIR_SCHEMA = _schema(
    {
        "id": _string(),
        "rule": _string(),
        "prompt": _messages(),
        "chosen": _messages(),
        "rejected": _messages(),
    }
)
KTO_SCHEMA = _schema(
    {
        "prompt": _messages(),
        "completion": _messages(),
        "label": (pa.bool_(), {"dtype": "bool", "_type": "Value"}),
    }
)


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
            _to_parquet(pair_records(pairs[split]), PAIR_SCHEMA, tmp / f"pairs-{split}.parquet")
            _to_parquet(kto_records(kto[split]), KTO_SCHEMA, tmp / f"kto-{split}.parquet")
        hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        tmp.chmod(0o755)
        if target.exists():  # left by a build whose id the sequence gave out and lost
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hashes


def _to_parquet(columns: dict[str, list[Any]], schema: pa.Schema, path: Path) -> None:
    # pyarrow converts the nested columns in C++; Dataset.from_dict would encode every
    # example in Python (7 s on 170k pairs). The schema carries the HF features, so
    # datasets reads the files back with the same types.
    table = pa.Table.from_pydict(columns, schema=schema)
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


def load(path: Path, files: dict[str, str], kind: str = "pairs") -> "DatasetDict":
    """The snapshot's `pairs` or `kto` data as train/test splits, after verification."""
    from datasets import Dataset, DatasetDict

    verify(path, files)
    # Read with pyarrow: `Dataset.from_parquet` refuses empty files and fills the cache.
    return DatasetDict({s: Dataset(pq.read_table(path / f"{kind}-{s}.parquet")) for s in SPLITS})
