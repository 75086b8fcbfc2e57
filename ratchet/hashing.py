"""Content hashes for model and adapter directories.

A directory's hash covers each file's relative name and bytes, in sorted order, so
the same files give the same hash wherever they are copied to.
"""

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

_CHUNK = 1 << 20
# What defines a PEFT LoRA, and so its identity. Weights only as safetensors: a
# pickled adapter_model.bin runs code when it is loaded.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(root: Path, files: Iterable[Path]) -> str:
    """Hash of (relative name, content hash) for each file, in sorted name order."""
    rels = (f.relative_to(root).as_posix() for f in files)
    return sha256_named({rel: sha256_file(root / rel) for rel in rels})


def sha256_named(file_hashes: Mapping[str, str]) -> str:
    """`sha256_files` from content hashes already computed: {relative name: hex digest}."""
    digest = hashlib.sha256()
    for rel in sorted(file_hashes):
        digest.update(rel.encode() + b"\0" + file_hashes[rel].encode() + b"\n")
    return digest.hexdigest()


def weights_sha256(model_dir: Path) -> str:
    """Hash of a model's weight files (safetensors, or .bin when there are none)."""
    files = list(model_dir.glob("*.safetensors")) or list(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    return sha256_files(model_dir, files)


def adapter_sha256(adapter_dir: Path) -> str:
    """Hash of everything that defines a PEFT adapter: its config and its weights."""
    files = [adapter_dir / name for name in ADAPTER_FILES if (adapter_dir / name).is_file()]
    return sha256_files(adapter_dir, files)
