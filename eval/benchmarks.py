"""Benchmarks of the promotion gate: per-item lm-eval scores of a base model + adapter.

`run_benchmarks` scores the same fixed rows (eval/benchdata.py) for production and for
a candidate; the gate then compares them item by item (`paired`). Per-item results,
not just accuracies, because paired comparisons on a few hundred items detect far
smaller regressions than two independent means, and because the loglikelihoods let
`check_adapter_applied` prove that the candidate's adapter was really in the model.
"""

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from eval.benchdata import DEFAULT_SEED, ensure_benchmark_data
from eval.errors import AdapterNotApplied, EvalError

TASKS_DIR = Path(__file__).with_name("tasks")
RATCHET_TASKS: tuple[str, ...] = (
    "ratchet_arc_easy",
    "ratchet_arc_challenge",
    "ratchet_hellaswag",
    "ratchet_mmlu",
)
# Candidate and production must differ by more than float noise somewhere; see
# check_adapter_applied.
LOGLIK_TOLERANCE = 1e-6
# vLLM only accepts these LoRA ranks as max_lora_rank.
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)

Backend = Literal["hf", "vllm"]


class ItemResult(BaseModel):
    """One benchmark item as scored by one model."""

    model_config = ConfigDict(frozen=True)

    doc_id: int  # position in the task's rows: the key that pairs two runs
    item_id: str  # the row's stable id (e.g. "arc_easy/Mercury_7220990")
    correct: bool  # acc: the highest-loglikelihood choice is the gold one
    correct_norm: bool | None  # acc_norm (length-normalized), where the task has it
    logliks: list[float]  # per choice, in the task's choice order


Results = dict[str, list[ItemResult]]


def run_benchmarks(
    base_model: str,
    adapter_dir: str | None,
    data_dir: Path,
    tasks: Sequence[str],
    items: int,
    batch_size: int = 8,
    backend: Backend = "hf",
    device: str | None = None,
    extra_tasks: Sequence[str] = (),
    *,
    seed: int = DEFAULT_SEED,
    extra_model_args: Mapping[str, Any] | None = None,
) -> Results:
    """Score `base_model` (+ `adapter_dir`, a PEFT LoRA) on `tasks`; results per task.

    `tasks` are names from eval/tasks (RATCHET_TASKS, or the group
    "ratchet_benchmarks"), scored on the seeded `items`-row subsets built under
    `data_dir/benchmarks` (rows fetched into `data_dir/cache` once). `extra_tasks` are
    stock lm-eval task names, passed through as they are (they need the hub), capped
    at `items` rows. `extra_model_args` go to the lm-eval model as they are, e.g.
    {"gpu_memory_utilization": 0.3} for vLLM beside a serving engine.
    """
    names = [*tasks, *extra_tasks]
    if not names:
        raise EvalError("no benchmark tasks to run")
    bench_dir = ensure_benchmark_data(data_dir / "benchmarks", data_dir / "cache", items, seed)
    model_args = _model_args(backend, base_model, adapter_dir) | dict(extra_model_args or {})
    raw = _evaluate(backend, model_args, names, bench_dir, items, batch_size, device, extra_tasks)
    return {task: _item_results(task, samples) for task, samples in raw.items()}


def _model_args(backend: Backend, base_model: str, adapter_dir: str | None) -> dict[str, Any]:
    if backend == "hf":
        # fp32: under bf16 rounding the dequantized default base drifts (FACTS.md), and
        # score differences between production and candidate must be the adapter's.
        args: dict[str, Any] = {"pretrained": base_model, "dtype": "float32"}
        if adapter_dir:
            args["peft"] = adapter_dir
        return args
    # fp32 as for hf (vLLM's "auto" would downcast an fp32 checkpoint to bf16), and a
    # short context: benchmark prompts are far below 2048 tokens and the KV cache is
    # sized for max_model_len. Larger bases override both through extra_model_args.
    args = {"pretrained": base_model, "dtype": "float32", "max_model_len": 2048}
    # lm-eval's VLLM wraps `lora_local_path` in a LoRARequest on every call and sets
    # enable_lora itself; the engine must also allow the adapter's rank.
    if adapter_dir:
        args["lora_local_path"] = adapter_dir
        args["max_lora_rank"] = _vllm_max_lora_rank(Path(adapter_dir))
    return args


def _vllm_max_lora_rank(adapter_dir: Path) -> int:
    try:
        rank = int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"cannot read the LoRA rank of {adapter_dir}: {exc}") from exc
    for allowed in _VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise EvalError(f"LoRA rank {rank} of {adapter_dir} is above what vLLM supports")


def _evaluate(
    backend: Backend,
    model_args: dict[str, Any],
    names: list[str],
    bench_dir: Path,
    items: int,
    batch_size: int,
    device: str | None,
    extra_tasks: Sequence[str],
) -> dict[str, list[dict[str, Any]]]:
    """simple_evaluate with samples logged; lm-eval's raw per-task samples."""
    # lm_eval ships no type hints; unused-ignore keeps this clean once pyproject ignores it.
    from lm_eval import simple_evaluate  # type: ignore[import-untyped, unused-ignore]
    from lm_eval.tasks import TaskManager  # type: ignore[import-untyped, unused-ignore]

    manager = TaskManager(
        include_path=str(TASKS_DIR),
        # Indexing lm-eval's thousands of stock YAMLs costs seconds; only for extras.
        include_defaults=bool(extra_tasks),
        metadata={"ratchet_benchmark_dir": str(bench_dir)},
    )
    out = simple_evaluate(
        model=backend,
        model_args=model_args,
        tasks=names,
        batch_size=batch_size,
        device=None if backend == "vllm" else device or _default_device(),
        limit=items,  # ours hold `items` rows already; this caps the stock extras
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,  # the gate does its own paired statistics
    )
    if out is None or "samples" not in out:
        raise EvalError("lm-eval returned no per-sample results")
    samples: dict[str, list[dict[str, Any]]] = out["samples"]
    return samples


def _default_device() -> str:
    # lm-eval's HF model assumes "cuda" when given no device, and fails on CPU machines.
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _item_results(task: str, samples: list[dict[str, Any]]) -> list[ItemResult]:
    results = [_item_result(task, sample) for sample in samples]
    results.sort(key=lambda r: r.doc_id)
    return results


def _item_result(task: str, sample: dict[str, Any]) -> ItemResult:
    # For loglikelihood requests each filtered response is (loglikelihood, is_greedy).
    try:
        logliks = [float(resp[0]) for resp in sample["filtered_resps"]]
        correct = bool(sample["acc"])
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise EvalError(
            f"{task}: not a multiple-choice result with acc (doc {sample.get('doc_id')})"
        ) from exc
    doc = sample.get("doc")
    item_id = doc.get("id") if isinstance(doc, dict) else None
    norm = sample.get("acc_norm")
    return ItemResult(
        doc_id=int(sample["doc_id"]),
        item_id=str(item_id if item_id is not None else sample["doc_id"]),
        correct=correct,
        correct_norm=None if norm is None else bool(norm),
        logliks=logliks,
    )


def paired(
    production: Results, candidate: Results
) -> dict[str, list[tuple[ItemResult, ItemResult]]]:
    """(production, candidate) per item, per task; refused unless both scored the same rows."""
    if set(production) != set(candidate):
        raise EvalError(
            f"results cover different tasks: {sorted(production)} vs {sorted(candidate)}"
        )
    pairs: dict[str, list[tuple[ItemResult, ItemResult]]] = {}
    for task, prod_items in production.items():
        cand_items = candidate[task]
        keys = [(r.doc_id, r.item_id) for r in prod_items]
        if keys != [(r.doc_id, r.item_id) for r in cand_items]:
            raise EvalError(f"{task}: production and candidate scored different items")
        pairs[task] = list(zip(prod_items, cand_items, strict=True))
    return pairs


def check_adapter_applied(
    production: Results, candidate: Results, *, tolerance: float = LOGLIK_TOLERANCE
) -> None:
    """Raise AdapterNotApplied when the candidate scored exactly like production.

    Any real adapter moves some loglikelihood; identical ones mean the harness scored
    the base model (lm-eval has shipped such bugs) or the adapter is a no-op (LoRA B
    matrices all zero). Either way its benchmark results say nothing about it.

    Both runs must share tasks, items, batch size and backend: lm-eval batches requests
    across tasks, and other batch neighbours alone move fp32 loglikelihoods by ~1e-5,
    which would hide a no-op adapter. Raise `tolerance` for nondeterministic kernels.
    """
    pairs = paired(production, candidate)
    compared = 0
    for items in pairs.values():
        for prod, cand in items:
            if len(prod.logliks) != len(cand.logliks):
                raise EvalError(
                    f"{prod.item_id}: production and candidate scored different choices"
                )
            for a, b in zip(prod.logliks, cand.logliks, strict=True):
                if not math.isclose(a, b, rel_tol=0.0, abs_tol=tolerance):
                    return
                compared += 1
    if compared == 0:
        raise EvalError("no benchmark loglikelihoods to compare")
    raise AdapterNotApplied(
        f"the candidate's {compared} benchmark loglikelihoods all equal production's "
        f"(within {tolerance}): its adapter was not applied or changes nothing"
    )
