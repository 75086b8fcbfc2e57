"""Export a snapshot for a trainer: TRL or Axolotl dataset directories, or JSONL.

- `trl`: `prompt` (messages), `chosen`, `rejected` (one assistant message each), the
  conversational preference format TRL's DPOTrainer takes unchanged.
- `axolotl`: `conversation` (messages), `chosen`, `rejected` (one message dict each),
  as read by Axolotl's DPO `chat_template.default` type with
  `field_messages: conversation`.
- `jsonl`: one object per pair, with its split, id and rule.
"""

import json
from pathlib import Path
from typing import Literal

from datasets import Dataset, DatasetDict, Features, List, Value

from feedback.errors import FeedbackError
from feedback.pairs.snapshots import Snapshot

Format = Literal["trl", "axolotl", "jsonl"]
FORMATS: tuple[Format, ...] = ("trl", "axolotl", "jsonl")
_MESSAGE = {"role": Value("string"), "content": Value("string")}
MESSAGES = List(_MESSAGE)
AXOLOTL_FEATURES = Features({"conversation": MESSAGES, "chosen": _MESSAGE, "rejected": _MESSAGE})


def export(snapshot: Snapshot, fmt: Format, out: Path) -> Path:
    """Write the snapshot's pairs to `out` in `fmt`; refuses to overwrite anything."""
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise FeedbackError(f"{out} already exists; choose a new path")
    data = snapshot.load("pairs")
    if fmt == "jsonl":
        _jsonl(data, out)
    elif fmt == "trl":
        _save(data.select_columns(["prompt", "chosen", "rejected"]), out)
    else:
        _save(DatasetDict({s: _axolotl(d) for s, d in data.items()}), out)
    return out


def _save(data: DatasetDict, out: Path) -> None:
    # One shard per split, even an empty one: with zero shards load_from_disk fails.
    data.save_to_disk(str(out), num_shards=dict.fromkeys(data, 1))


def _axolotl(data: Dataset) -> Dataset:
    # Built column-wise with explicit features: `map` on an empty split drops its columns.
    return Dataset.from_dict(
        {
            "conversation": data["prompt"],
            "chosen": [m[0] for m in data["chosen"]],
            "rejected": [m[0] for m in data["rejected"]],
        },
        features=AXOLOTL_FEATURES,
    )


def _jsonl(data: DatasetDict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for split, rows in data.items():
            for r in rows:
                record = {
                    "split": split,
                    "id": r["id"],
                    "rule": r["rule"],
                    "prompt": r["prompt"],
                    "chosen": r["chosen"][0]["content"],
                    "rejected": r["rejected"][0]["content"],
                }
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
