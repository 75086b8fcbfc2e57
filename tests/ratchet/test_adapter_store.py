"""Storing an adapter's files (ratchet.registry stage/publish): only what a PEFT LoRA
needs is copied, readable by all, and checked against the source's hashes; symlinks,
pickled weights and oversized adapters are refused; a refusal leaves nothing behind."""

import asyncio
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from ratchet import registry
from ratchet.hashing import adapter_sha256
from ratchet.registry import COPIED_FILES, TRAINING_CARD, AdapterError


def fake_adapter(path: Path, weights: bytes = b"w" * 4096) -> Path:
    """Files shaped like a PEFT LoRA (nothing here loads them into an engine)."""
    path.mkdir(parents=True)
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def entries(adapters_dir: Path) -> list[str]:
    return sorted(p.name for p in adapters_dir.iterdir()) if adapters_dir.exists() else []


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_only_the_adapter_files_are_copied_and_readable_by_all(
    tmp_path: Path, strict_umask: None
) -> None:
    source = fake_adapter(tmp_path / "source")
    (source / TRAINING_CARD).write_text('{"run_id": 1}')
    (source / "README.md").write_text("# model card")
    (source / "optimizer.pt").write_bytes(b"o" * 100)
    (source / "adapter_model.bin").write_bytes(b"a pickle")
    (source / ".env").write_text("SECRET=1")
    (source / "checkpoint-10").mkdir()
    (source / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"old")
    for path in source.iterdir():
        path.chmod(0o600 if path.is_file() else 0o700)
    source.chmod(0o700)
    adapters = tmp_path / "adapters"

    sha, stored = registry.store_files(source, adapters)

    assert stored == adapters / sha and entries(adapters) == [sha]  # no .incoming-* left
    assert sorted(p.name for p in stored.iterdir()) == sorted(COPIED_FILES)
    for name in COPIED_FILES:
        assert (stored / name).read_bytes() == (source / name).read_bytes()
    # The identity covers the adapter itself, as copied: not the .bin, nor the cards.
    assert sha == adapter_sha256(source) == adapter_sha256(stored)
    assert stat.S_IMODE(stored.stat().st_mode) == 0o755
    assert stat.S_IMODE(adapters.stat().st_mode) == 0o755
    assert {stat.S_IMODE((stored / n).stat().st_mode) for n in COPIED_FILES} == {0o644}


def test_the_size_cap_counts_the_copied_files(tmp_path: Path) -> None:
    source = fake_adapter(tmp_path / "source")
    (source / "README.md").write_bytes(b"r" * 1000)
    (source / "optimizer.pt").write_bytes(b"o" * 100_000)  # not copied, not counted
    total = sum((source / n).stat().st_size for n in COPIED_FILES if (source / n).exists())
    adapters = tmp_path / "adapters"
    with pytest.raises(AdapterError) as refused:
        registry.store_files(source, adapters, max_bytes=total - 1)
    assert refused.value.code == "adapter_too_large" and str(total) in str(refused.value)
    assert entries(adapters) == []
    sha, _ = registry.store_files(source, adapters, max_bytes=total)
    assert entries(adapters) == [sha]


def _rewrite(path: Path) -> None:
    path.write_bytes(b"x" * path.stat().st_size)  # same size, other bytes


def _grow(path: Path) -> None:
    with path.open("ab") as out:
        out.write(b"more")


def _shrink(path: Path) -> None:
    os.truncate(path, 10)


@pytest.mark.parametrize("change", [_rewrite, _grow, _shrink], ids=["rewrite", "grow", "shrink"])
def test_a_file_changed_during_the_copy_is_refused(
    tmp_path: Path, change: Callable[[Path], None]
) -> None:
    source = fake_adapter(tmp_path / "source")
    adapters = tmp_path / "adapters"

    def meanwhile(name: str) -> None:  # after the source was hashed, before this copy
        if name == "adapter_model.safetensors":
            change(source / name)

    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(AdapterError) as refused:
            registry.stage(fd, str(source), adapters, before_copy=meanwhile)
    finally:
        os.close(fd)
    assert refused.value.code == "adapter_changed"
    assert entries(adapters) == []  # the partial copy is gone


def test_a_file_replaced_during_the_copy_gives_the_file_that_was_hashed(tmp_path: Path) -> None:
    source = fake_adapter(tmp_path / "source")
    original = (source / "adapter_model.safetensors").read_bytes()
    sha = adapter_sha256(source)

    def swap(name: str) -> None:  # a new file renamed over the old name
        if name == "adapter_model.safetensors":
            (tmp_path / "evil").write_bytes(b"e" * 4096)
            os.replace(tmp_path / "evil", source / name)

    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    try:
        staged = registry.stage(fd, str(source), tmp_path / "adapters", before_copy=swap)
    finally:
        os.close(fd)
    assert staged.sha256 == sha
    assert (staged.path / "adapter_model.safetensors").read_bytes() == original


def test_symlinks_are_refused(tmp_path: Path) -> None:
    real = fake_adapter(tmp_path / "real")
    (tmp_path / "linked-dir").symlink_to(real, target_is_directory=True)
    linked_weights = fake_adapter(tmp_path / "linked-weights")
    (linked_weights / "adapter_model.safetensors").unlink()
    (linked_weights / "adapter_model.safetensors").symlink_to(real / "adapter_model.safetensors")
    linked_extra = fake_adapter(tmp_path / "linked-extra")  # even a file we would not copy
    (linked_extra / "notes.txt").symlink_to("/etc/passwd")
    adapters = tmp_path / "adapters"
    for source in (tmp_path / "linked-dir", linked_weights, linked_extra):
        with pytest.raises(AdapterError) as refused:
            registry.store_files(source, adapters)
        assert refused.value.code == "symlink_not_allowed", source
    assert entries(adapters) == []


def test_pickled_weights_and_special_files_are_refused(tmp_path: Path) -> None:
    pickled = fake_adapter(tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    fifo = fake_adapter(tmp_path / "fifo")
    (fifo / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo / "adapter_model.safetensors")  # must not hang the copy
    adapters = tmp_path / "adapters"
    with pytest.raises(AdapterError, match="only adapter_model.safetensors") as refused:
        registry.store_files(pickled, adapters)
    assert refused.value.code == "invalid_adapter"
    with pytest.raises(AdapterError, match="not a regular file"):
        registry.store_files(fifo, adapters)
    assert entries(adapters) == []


def test_publish_keeps_an_intact_copy_and_unpublish_removes_only_its_own(
    tmp_path: Path,
) -> None:
    source = fake_adapter(tmp_path / "source")
    adapters = tmp_path / "adapters"
    first = registry.publish(registry.stage_path(source, adapters, None))
    second_staged = registry.stage_path(source, adapters, None)
    second = registry.publish(second_staged)
    assert first.created and not second.created and second.path == first.path
    assert not second_staged.path.exists()

    registry.unpublish(second)  # the files are the first registration's
    assert adapter_sha256(first.path) == first.sha256

    (first.path / "adapter_model.safetensors").write_bytes(b"damaged")
    repaired = registry.publish(registry.stage_path(source, adapters, None))
    assert repaired.created and adapter_sha256(repaired.path) == first.sha256

    registry.unpublish(repaired)
    assert entries(adapters) == []  # no .removing-* either


def test_import_paths_stay_under_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "imports"
    fake_adapter(root / "team" / "lora")
    fake_adapter(tmp_path / "outside")
    fd = registry.open_import_dir("team/lora", [root])  # relative: below the first root
    try:
        assert sorted(os.listdir(fd)) == ["adapter_config.json", "adapter_model.safetensors"]
    finally:
        os.close(fd)
    messages = set()
    for path in ("../outside", f"{root}/team/../../outside", str(tmp_path / "outside"),
                 str(tmp_path / "missing"), "/etc", "x\0y"):  # fmt: skip
        with pytest.raises(AdapterError) as refused:
            registry.open_import_dir(path, [root])
        assert refused.value.code == "path_not_allowed", path
        messages.add(str(refused.value))
    assert len(messages) == 1  # the same words whether the path exists or not


def test_the_lock_is_shared_across_connections(database_url: str) -> None:
    sha = "ab" * 32

    async def contend() -> None:
        async with (
            await psycopg.AsyncConnection.connect(database_url) as holder,
            await psycopg.AsyncConnection.connect(database_url) as other,
        ):
            async with registry.locked(holder, sha):
                await other.execute("SET lock_timeout = '200ms'")
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    async with registry.locked(other, sha):
                        pass
                await other.rollback()
                async with registry.locked(other, "cd" * 32):  # another hash: not blocked
                    pass
            async with registry.locked(other, sha):  # released with the transaction
                pass

    asyncio.run(contend())
