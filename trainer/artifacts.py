"""Adapters as artifacts: checked, carded, and moved under their hash in one rename.

A run trains into `adapters/.work-<run id>/`; only a preflighted adapter with its
training card is renamed to `adapters/<sha256>/` and registered. A run killed before
that leaves a `.work-*` directory that `sweep` removes, never a half-written
`<sha256>/`.
"""

import importlib.metadata
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ratchet.hashing import adapter_sha256
from ratchet.registry import DIR_MODE, FILE_MODE
from ratchet.registry import TRAINING_CARD as CARD
from trainer.preflight import preflight

_LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


def work_dir(adapters_dir: Path, run_id: int) -> Path:
    return adapters_dir / f".work-{run_id}"


def sweep(adapters_dir: Path, keep: set[int]) -> list[Path]:
    """Remove the work directories of runs that are not in `keep` (still running)."""
    removed = []
    for path in adapters_dir.glob(".work-*") if adapters_dir.is_dir() else []:
        run_id = path.name.removeprefix(".work-")
        if run_id.isdigit() and int(run_id) not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def finalize(
    trained: Path,
    adapters_dir: Path,
    base_model: str,
    max_lora_rank: int,
    card: dict[str, Any],
) -> tuple[str, Path]:
    """Preflight `trained`, add its card, rename it to `adapters/<sha256>/`."""
    base_config = (
        json.loads((Path(base_model) / "config.json").read_text())
        if Path(base_model).is_dir()
        else {"architectures": [card.get("architecture", "?")]}
    )
    preflight(trained, base_config, max_lora_rank)
    sha = adapter_sha256(trained)  # the card is not part of the hash: it holds timings
    full_card = {
        **card,
        "adapter_sha256": sha,
        "library_versions": library_versions(),
        "created_at": datetime.now(UTC).isoformat(),
    }
    (trained / CARD).write_text(json.dumps(full_card, indent=2, default=str) + "\n")
    # Readable by an engine running as another user, whatever the umask.
    os.chmod(trained, DIR_MODE)
    for item in trained.iterdir():
        if item.is_file():
            os.chmod(item, FILE_MODE)
    target = adapters_dir / sha
    if target.exists():  # the very same adapter again (same data, config and seed)
        shutil.rmtree(trained)
    else:
        os.rename(trained, target)
    return sha, target
