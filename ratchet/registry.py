"""The adapter registry: which LoRA adapters exist, and which is production.

Adapters are content-addressed. Their files live in `adapters/<sha256>/`, and the
name they are loaded under in vLLM is derived from that hash, so a new adapter can
never be confused with an old one. Production is the target of the latest row of
the append-only `promotions` table (none, or a NULL target, means the base model).

Registering copies an adapter in two steps. `stage` copies the few files a PEFT LoRA
needs into a private `adapters/.incoming-*/` directory, refusing symlinks and
oversized adapters, and checks the copy against the source's hashes. `publish` then
renames it to `adapters/<sha256>/`, holding `locked(sha256)`: a Postgres advisory lock
shared by every gateway and the CLI, so two registrations of one adapter never touch
each other's files, and only a registration that put the files there removes them.
"""

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.rows import class_row
from pydantic import BaseModel

from ratchet.errors import RatchetError
from ratchet.hashing import ADAPTER_FILES, adapter_sha256, sha256_file, sha256_named

AdapterStatus = Literal[
    "candidate", "evaluating", "rejected", "passed", "awaiting_review", "production", "retired"
]
# Statuses of an adapter still on its way to production; the newest is "candidate".
CANDIDATE_STATUSES = ("candidate", "evaluating", "passed", "awaiting_review")
# Written beside every trained adapter: where it came from (see trainer/artifacts.py).
TRAINING_CARD = "training-card.json"
# What a registration copies: the adapter (its identity, see ratchet.hashing), our
# training card and PEFT's model card. Anything else in the directory (checkpoints,
# optimizer states, subdirectories) is left where it is.
COPIED_FILES = (*ADAPTER_FILES, TRAINING_CARD, "README.md")
# The engine may run as another user: stored adapters are readable by all, whatever
# the umask or the source's modes.
DIR_MODE = 0o755
FILE_MODE = 0o644
_LOCK_CLASS = 0x41444150  # "ADAP": the first key of the registry's advisory locks
_CHUNK = 1 << 20
_COLUMNS = "id, sha256, engine_name, path, base_model_sha256, status, source, created_at"


class AdapterError(RatchetError):
    """An adapter directory is unusable, or the registry refuses it. `code` says why,
    for API clients: invalid_adapter, path_not_allowed, symlink_not_allowed,
    adapter_too_large or adapter_changed."""

    def __init__(self, message: str, code: str = "invalid_adapter") -> None:
        super().__init__(message)
        self.code = code


class Adapter(BaseModel):
    id: uuid.UUID
    sha256: str
    engine_name: str
    path: str
    base_model_sha256: str | None
    status: AdapterStatus
    source: str
    created_at: datetime


@dataclass(frozen=True)
class Staged:
    """A verified copy of an adapter in a private directory, not yet under its hash."""

    sha256: str
    path: Path
    adapters_dir: Path
    config: dict[str, Any]


@dataclass(frozen=True)
class Stored:
    """An adapter's files under its hash; `created` when this registration put them
    there (and so may remove them again)."""

    sha256: str
    path: Path
    created: bool


def engine_name_for(sha256: str) -> str:
    return f"ratchet-{sha256[:16]}"


def check_adapter_dir(path: Path) -> dict[str, Any]:
    """Return the adapter's PEFT config, or raise AdapterError saying what is missing."""
    config_file = path / "adapter_config.json"
    if not path.is_dir() or not config_file.is_file():
        raise AdapterError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        raise AdapterError(f"{path} has no adapter_model.safetensors")
    return _parse_config(config_file.read_bytes(), str(config_file))


def _parse_config(text: bytes, shown: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise AdapterError(f"{shown} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{shown} must hold a JSON object")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterError(f"{shown}: 'r' (the LoRA rank) must be a positive integer")
    return config


def store_files(source: Path, adapters_dir: Path, max_bytes: int | None = None) -> tuple[str, Path]:
    """Copy an adapter into `adapters_dir/<sha256>/`; return (sha256, path).

    `stage` and `publish` without the lock, for callers that register nothing or
    nothing concurrently (tests). An intact copy already under the hash is kept.
    """
    staged = stage_path(source, adapters_dir, max_bytes)
    try:
        return staged.sha256, publish(staged).path
    finally:
        discard(staged)


def stage_import(
    path: str, roots: Sequence[Path], adapters_dir: Path, max_bytes: int | None
) -> Staged:
    """`stage` for the API: only a directory under one of `roots`, reached without symlinks."""
    fd = open_import_dir(path, roots)
    try:
        return stage(fd, path, adapters_dir, max_bytes)
    finally:
        os.close(fd)


def stage_path(source: Path, adapters_dir: Path, max_bytes: int | None) -> Staged:
    """`stage` for someone on the machine (the CLI): any path, as long as the adapter
    directory itself is not a symlink."""
    shown = str(source)
    fd = _open_dir(str(source), None, shown)
    try:
        return stage(fd, shown, adapters_dir, max_bytes)
    finally:
        os.close(fd)


def open_import_dir(path: str, roots: Sequence[Path]) -> int:
    """Open `path` (relative paths: below the first root) if it is under an import root.

    The path is normalized as text, so `..` cannot climb out, and compared with the
    roots before anything on disk is looked at: the refusal says nothing about what
    exists. Below the root, each component is opened with O_NOFOLLOW relative to its
    parent, so no symlink, not even one swapped in after a check, leads elsewhere.
    """
    wanted = Path(os.path.normpath(Path(roots[0], path))) if "\0" not in path else None
    for root in roots:
        if wanted is not None and wanted.is_relative_to(root):
            return _open_below(root, wanted.relative_to(root).parts, path)
    raise AdapterError(
        "the API registers adapters only from under the import roots "
        f"({', '.join(str(r) for r in roots)}); copy the adapter there, or use "
        "`ratchet adapters register` on the gateway's machine",
        code="path_not_allowed",
    )


def _open_below(root: Path, parts: Sequence[str], shown: str) -> int:
    fd = _open_dir(str(root), None, shown)
    try:
        for part in parts:
            parent, fd = fd, -1
            try:
                fd = _open_dir(part, parent, shown)
            finally:
                os.close(parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd


def _open_dir(name: str, dir_fd: int | None, shown: str) -> int:
    """Open a directory without following a symlink at its last component."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except (OSError, ValueError) as exc:
        if _is_symlink(name, dir_fd):
            raise _symlink(shown) from exc
        raise AdapterError(f"{shown} is not a PEFT adapter directory (no such directory)") from exc


def _is_symlink(name: str, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except (OSError, ValueError):
        return False


def _symlink(shown: str) -> AdapterError:
    return AdapterError(
        f"{shown} is, goes through or contains a symlink; register a directory of plain "
        "files (copy it with `cp -rL`)",
        code="symlink_not_allowed",
    )


def _changed(shown: str) -> AdapterError:
    return AdapterError(
        f"{shown} changed while it was being copied; nothing was stored. Try again once "
        "whatever writes it has finished.",
        code="adapter_changed",
    )


def stage(
    source_fd: int,
    shown: str,
    adapters_dir: Path,
    max_bytes: int | None = None,
    before_copy: Callable[[str], None] | None = None,
) -> Staged:
    """Copy an adapter from the open directory `source_fd` to `adapters_dir/.incoming-*/`.

    The source's files are opened once (O_NOFOLLOW) and hashed, then copied from the
    same descriptors; the copy is hashed again and must match, so a file rewritten
    during the copy is refused rather than stored under a hash it does not have. The
    config is checked on the copy: what is checked is what is stored. `before_copy(name)`
    runs before each file is copied (a seam for tests). `shown` names the source in errors.
    """
    files = _open_files(source_fd, shown)
    try:
        sizes = {name: os.fstat(fd).st_size for name, fd in files.items()}
        if max_bytes is not None and sum(sizes.values()) > max_bytes:
            raise AdapterError(
                f"{shown}: the adapter's files ({', '.join(sorted(files))}) hold "
                f"{sum(sizes.values())} bytes, over the limit of {max_bytes} "
                "(setting adapter_max_bytes)",
                code="adapter_too_large",
            )
        expected = {name: _hash_fd(fd, sizes[name], shown) for name, fd in files.items()}
        tmp = _private_dir(adapters_dir)
        try:
            for name, fd in files.items():
                if before_copy is not None:
                    before_copy(name)
                _copy_fd(fd, sizes[name], tmp / name, shown)
            if {name: sha256_file(tmp / name) for name in files} != expected:
                raise _changed(shown)
            config_file = tmp / "adapter_config.json"
            config = _parse_config(config_file.read_bytes(), f"{shown}/adapter_config.json")
            os.chmod(tmp, DIR_MODE)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for fd in files.values():
            os.close(fd)
    sha = sha256_named({name: h for name, h in expected.items() if name in ADAPTER_FILES})
    return Staged(sha256=sha, path=tmp, adapters_dir=adapters_dir, config=config)


def _open_files(dir_fd: int, shown: str) -> dict[str, int]:
    """The copied files of the directory, opened; no symlink anywhere in it."""
    files: dict[str, int] = {}
    try:
        names = sorted(os.listdir(dir_fd))
        for name in names:
            if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
                raise _symlink(f"{shown}/{name}")
            if name in COPIED_FILES:
                files[name] = _open_file(name, dir_fd, f"{shown}/{name}")
        _require_adapter_files(set(names), files, shown)
    except OSError as exc:  # unreadable, or an entry removed while we looked
        for fd in files.values():
            os.close(fd)
        raise AdapterError(f"{shown} cannot be read: {exc.strerror}") from exc
    except BaseException:
        for fd in files.values():
            os.close(fd)
        raise
    return files


def _open_file(name: str, dir_fd: int, shown: str) -> int:
    # O_NONBLOCK: a FIFO under an adapter file's name must not hang the copy.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a symlink since the listing
            raise _symlink(shown) from exc
        raise AdapterError(f"{shown} cannot be read: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AdapterError(f"{shown} is not a regular file")
    return fd


def _require_adapter_files(names: set[str], files: dict[str, int], shown: str) -> None:
    if "adapter_config.json" not in files:
        raise AdapterError(f"{shown} is not a PEFT adapter directory (no adapter_config.json)")
    if "adapter_model.safetensors" not in files:
        if any(n.startswith("adapter_model.") for n in names):
            raise AdapterError(
                f"{shown}: only adapter_model.safetensors is accepted (a pickled "
                "adapter_model.bin runs code when it is loaded); save with "
                "safe_serialization=True"
            )
        raise AdapterError(f"{shown} has no adapter_model.safetensors")


def _chunks(fd: int, size: int, shown: str) -> Iterator[bytes]:
    """The file's `size` bytes (its size when opened); refused if it grew or shrank."""
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
        if not chunk:
            raise _changed(shown)
        offset += len(chunk)
        yield chunk
    if os.pread(fd, 1, size):
        raise _changed(shown)


def _hash_fd(fd: int, size: int, shown: str) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks(fd, size, shown):
        digest.update(chunk)
    return digest.hexdigest()


def _copy_fd(fd: int, size: int, target: Path, shown: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    out = os.open(target, flags, FILE_MODE)
    try:
        os.fchmod(out, FILE_MODE)  # whatever the umask
        for chunk in _chunks(fd, size, shown):
            os.write(out, chunk)  # a regular file: writes are complete
        os.fsync(out)
    finally:
        os.close(out)


def _private_dir(adapters_dir: Path) -> Path:
    if not adapters_dir.is_dir():
        adapters_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(adapters_dir, DIR_MODE)
    return Path(tempfile.mkdtemp(prefix=".incoming-", dir=adapters_dir))


def publish(staged: Staged) -> Stored:
    """Move a staged copy under its hash. An intact copy already there is kept (the
    staged one is dropped); a damaged one is replaced. Hold `locked(sha256)` around
    this and whatever registers the adapter, so that `unpublish` can undo it."""
    target = staged.adapters_dir / staged.sha256
    if _intact(target, staged.sha256):
        discard(staged)
        return Stored(staged.sha256, target, created=False)
    if target.exists() or target.is_symlink():
        _remove(target)  # a damaged copy under this hash, registered by nobody
    try:
        os.rename(staged.path, target)
    except OSError as exc:
        # Someone without the lock (a trainer, a test) put it there meanwhile.
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and _intact(target, staged.sha256):
            discard(staged)
            return Stored(staged.sha256, target, created=False)
        raise
    return Stored(staged.sha256, target, created=True)


def unpublish(stored: Stored) -> None:
    """Undo `publish` for a registration that failed: remove the files only if it put
    them there. Call it holding the lock, before anything registered the adapter."""
    if stored.created:
        _remove(stored.path)


def discard(staged: Staged) -> None:
    """Remove a staged copy (nothing left to do once `publish` has moved it)."""
    shutil.rmtree(staged.path, ignore_errors=True)


def _intact(target: Path, sha256: str) -> bool:
    return target.is_dir() and not target.is_symlink() and adapter_sha256(target) == sha256


def _remove(path: Path) -> None:
    """Take the hash's name back at once (a rename), then delete the files."""
    trash = path.with_name(f".removing-{uuid.uuid4().hex}")
    os.rename(path, trash)
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash)
    else:
        trash.unlink()


@asynccontextmanager
async def locked(conn: AsyncConnection, sha256: str) -> AsyncIterator[None]:
    """A transaction holding the registry's lock on one adapter hash, for every gateway
    and the CLI. Transaction-scoped, so a crashed holder cannot leave it taken."""
    key = int.from_bytes(bytes.fromhex(sha256[:8]), "big", signed=True)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s::int4, %s::int4)", (_LOCK_CLASS, key))
        yield


async def register(
    conn: AsyncConnection,
    sha256: str,
    path: Path,
    base_model_sha256: str | None,
    status: AdapterStatus = "candidate",
    source: str = "manual",
    run_id: int | None = None,
    snapshot_id: int | None = None,
) -> Adapter:
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(
            "INSERT INTO adapters"
            " (id, sha256, engine_name, path, base_model_sha256, status, source, run_id,"
            f" snapshot_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
            (
                uuid.uuid4(),
                sha256,
                engine_name_for(sha256),
                str(path),
                base_model_sha256,
                status,
                source,
                run_id,
                snapshot_id,
            ),
        )
        adapter = await cur.fetchone()
    assert adapter is not None
    return adapter


async def get_by_sha(conn: AsyncConnection, sha256: str) -> Adapter | None:
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(f"SELECT {_COLUMNS} FROM adapters WHERE sha256 = %s", (sha256,))
        return await cur.fetchone()


async def get_by_id(conn: AsyncConnection, adapter_id: uuid.UUID | None) -> Adapter | None:
    if adapter_id is None:
        return None
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(f"SELECT {_COLUMNS} FROM adapters WHERE id = %s", (adapter_id,))
        return await cur.fetchone()


async def find(conn: AsyncConnection, ref: str) -> Adapter | None:
    """An adapter by id, sha256 (or a unique prefix of 8+ hex digits) or engine name."""
    ref = ref.strip()
    try:
        return await get_by_id(conn, uuid.UUID(ref))
    except ValueError:
        pass
    if ref.startswith("ratchet-"):
        ref = ref.removeprefix("ratchet-")
    if len(ref) < 8 or any(c not in "0123456789abcdef" for c in ref):
        return None
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM adapters WHERE sha256 LIKE %s LIMIT 2", (ref + "%",)
        )
        found = await cur.fetchall()
    return found[0] if len(found) == 1 else None


async def set_status(conn: AsyncConnection, adapter_id: uuid.UUID, status: AdapterStatus) -> None:
    await conn.execute("UPDATE adapters SET status = %s WHERE id = %s", (status, adapter_id))


async def list_adapters(conn: AsyncConnection) -> list[Adapter]:
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(f"SELECT {_COLUMNS} FROM adapters ORDER BY created_at DESC")
        return await cur.fetchall()


async def production(conn: AsyncConnection) -> Adapter | None:
    """The adapter behind `production`, or None when production is the base model."""
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(
            f"SELECT {', '.join('a.' + c for c in _COLUMNS.split(', '))}"
            " FROM (SELECT to_adapter_id FROM promotions ORDER BY id DESC LIMIT 1) p"
            " JOIN adapters a ON a.id = p.to_adapter_id"
        )
        return await cur.fetchone()


async def candidate(conn: AsyncConnection) -> Adapter | None:
    """The newest adapter still on its way to production, if any."""
    async with conn.cursor(row_factory=class_row(Adapter)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM adapters WHERE status = ANY(%s)"
            " ORDER BY created_at DESC LIMIT 1",
            (list(CANDIDATE_STATUSES),),
        )
        return await cur.fetchone()
