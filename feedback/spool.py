"""A durable local spool for answer-log writes made while Postgres is down.

An append-only file of JSON lines, one line per unit of work (a completion, a vote,
a comparison with its two answers). `append` returns only after the line is on disk
(`fsync`), so whatever a client was told is stored is at least here. The file is
bounded by `max_bytes`; past that, `append` refuses (SpoolFull) and the gateway
answers 503. A torn last line (a crash mid-write) was never acknowledged and is
skipped on reading.

Each gateway process holds its own file under an exclusive lock (`flock`). Files of
processes that died (e.g. SIGKILL) are left unlocked and are replayed by the next
gateway that starts on the same directory.
"""

import fcntl
import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
Entry = list[dict[str, Any]]  # one line: the operations of one unit of work


class SpoolFull(Exception):
    """The spool is at its size limit; nothing was written."""


class SpoolFile:
    """One locked, append-only spool file."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self._cut_torn_tail()
        self.size = os.fstat(fd).st_size
        self.lines = sum(1 for _ in read_entries(path))

    def _cut_torn_tail(self) -> None:
        """Drop a last line without its newline (a crash mid-write, never acknowledged),
        so that the next line appended does not run into it."""
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            log.warning("%s: dropping a torn last line (%d bytes)", self.path, len(data) - keep)
            os.ftruncate(self.fd, keep)
            os.fsync(self.fd)

    @classmethod
    def claim(cls, path: Path) -> "SpoolFile | None":
        """Open and lock `path`; None when another live process holds it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(path, fd)

    def append(self, line: bytes) -> None:
        os.write(self.fd, line)
        os.fsync(self.fd)
        self.size += len(line)
        self.lines += 1

    def truncate(self) -> None:
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)
        self.size = self.lines = 0

    def close(self) -> None:
        os.close(self.fd)  # releases the lock


def read_batch(path: Path, offset: int, limit: int = 500) -> list[tuple[Entry, int]]:
    """At most `limit` lines from `offset`: a replay never holds a whole spool in memory."""
    return list(itertools.islice(read_entries(path, offset), limit))


def read_entries(path: Path, offset: int = 0) -> Iterator[tuple[Entry, int]]:
    """The complete lines of a spool file from byte `offset`, in order, each with the
    offset just past it."""
    with path.open("rb") as fh:
        fh.seek(offset)
        for raw in fh:
            if not raw.endswith(b"\n"):  # being written, or torn by a crash: not yet a line
                return
            offset += len(raw)
            try:
                entry = json.loads(raw)
            except ValueError:
                log.error("%s: skipping an unreadable line at byte %d", path, offset - len(raw))
                continue
            yield entry, offset


class Spool:
    """The spool directory as one gateway uses it: its own file, and the files that
    dead gateways left behind."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.own: SpoolFile | None = None

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        for n in range(1000):
            self.own = SpoolFile.claim(self.directory / f"spool-{n}.jsonl")
            if self.own is not None:
                log.info("answer-log spool: %s", self.own.path)
                return
        raise OSError(f"no free spool file in {self.directory}")

    def close(self) -> None:
        if self.own is not None:
            self.own.close()
            self.own = None

    @property
    def depth(self) -> int:
        return self.own.lines if self.own else 0

    @property
    def bytes(self) -> int:
        return self.own.size if self.own else 0

    def room_for(self, size: int) -> bool:
        return self.own is not None and self.own.size + size <= self.max_bytes

    def append(self, entry: Entry) -> None:
        """Write one unit of work durably; SpoolFull when it does not fit.

        Synchronous on purpose, fsync included (a few ms, and only while the database
        is down): no other coroutine can run in between, so appends never interleave,
        a cancelled request cannot leave a write half done behind a released lock, and
        a replay can check "nothing new" and truncate without a lock."""
        line = json.dumps(entry, separators=(",", ":"), default=str).encode() + b"\n"
        if not self.room_for(len(line)):
            raise SpoolFull(f"the spool is full ({self.bytes} of {self.max_bytes} bytes)")
        assert self.own is not None
        self.own.append(line)

    def orphans(self) -> list[SpoolFile]:
        """Spool files of processes that are gone, claimed for replay."""
        found = []
        for path in sorted(self.directory.glob("spool-*.jsonl")):
            if self.own is not None and path == self.own.path:
                continue
            claimed = SpoolFile.claim(path)
            if claimed is not None:
                found.append(claimed)
        return found
