"""LoRA on vLLM's CPU backend: vLLM's own punica ops vs Ratchet's grouped ones, in one run.

    .venv/bin/python bench/lora_cpu.py [--max-tokens 16] [--rounds 2]

Starts the engine as `ratchet serve` does, twice, one after the other: first with
`RATCHET_VLLM_GROUPED_LORA=0` (vLLM's per-token ops), then with the plugin of
ratchet/vllm_cpu_lora.py. Each answers the greedy diff's prompts (the 32 regression
prompts and 13 held-out-like ones) at temperature 0: the base alone, a LoRA alone
(the trainer's shape: rank 16 on every projection), and both at once, as an
evaluation sends them.

The last line is one JSON object: seconds per workload and side, the speed-ups, and
whether the answers agree (LoRA answers of both sides; the base's answers in a batch
shared with the LoRA against the base alone).
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eval import greedy  # noqa: E402
from ratchet.engine import EngineClient  # noqa: E402
from ratchet.model import prepare_default  # noqa: E402
from ratchet.settings import Settings  # noqa: E402
from ratchet.vllm_cpu_lora import ENV  # noqa: E402
from serve.supervisor import engine_command, engine_env  # noqa: E402
from tests.helpers import free_port, make_lora  # noqa: E402

TOPICS = ["cats", "dogs", "rivers", "mountains", "bread", "music", "trains", "coffee",
          "winter", "books", "gardens", "bees", "stars"]  # fmt: skip
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Answers = dict[str, list[str]]


def prompts() -> list[greedy.Prompt]:
    held = [greedy.Prompt("held_out", [{"role": "user", "content": f"Tell me about {t}."}])
            for t in TOPICS]  # fmt: skip
    return held + greedy.regression_prompts()


def start(settings: Settings, grouped: bool, log: Path) -> subprocess.Popen[bytes]:
    env = engine_env(settings) | {ENV: "1" if grouped else "0"}
    with log.open("ab") as out:
        process = subprocess.Popen(
            engine_command(settings), env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 600
    url = f"http://127.0.0.1:{settings.engine_port}/health"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the engine exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the engine did not come up in 600 s")


async def workloads(
    url: str, lora: Path, max_tokens: int, rounds: int
) -> tuple[dict[str, float], Answers]:
    engine = EngineClient(url)
    items = prompts()
    try:
        await greedy.ensure_loaded(engine, "bench-lora", str(lora))
        base = str([m["id"] for m in await engine.models() if not m.get("parent")][0])

        async def run(names: list[str], tokens: int) -> tuple[float, list[list[str]]]:
            limit = asyncio.Semaphore(32)  # the evaluator's default concurrency
            started = time.perf_counter()
            done = await asyncio.gather(
                *(greedy.answer_all(engine, n, items, tokens, limit) for n in names)
            )
            return time.perf_counter() - started, [[a.text for a in d] for d in done]

        await run([base, "bench-lora"], 4)  # the first batches of each shape are slow once
        seconds: dict[str, list[float]] = {"base": [], "lora": [], "mixed": []}
        answers: Answers = {}
        for _ in range(rounds):
            for kind, names in (("base", [base]), ("lora", ["bench-lora"]),
                                ("mixed", [base, "bench-lora"])):  # fmt: skip
                took, texts = await run(names, max_tokens)
                seconds[kind].append(took)
                answers[kind] = texts[0]
                if kind == "mixed":
                    answers["mixed_base"], answers["mixed_lora"] = texts
        return {k: round(min(v), 2) for k, v in seconds.items()}, answers
    finally:
        await engine.aclose()


def side(settings: Settings, grouped: bool, lora: Path, args: argparse.Namespace,
         log: Path) -> tuple[dict[str, float], Answers]:  # fmt: skip
    process = start(settings, grouped, log)
    try:
        url = f"http://127.0.0.1:{settings.engine_port}"
        figures, answers = asyncio.run(workloads(url, lora, args.max_tokens, args.rounds))
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=60)
    label = "grouped" if grouped else "stock"
    print(f"{label}: {figures}", file=sys.stderr)
    return figures, answers


def agree(a: list[str], b: list[str]) -> float:
    return round(sum(x == y for x, y in zip(a, b, strict=True)) / len(a), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="best of this many runs")
    args = parser.parse_args()
    base = Settings()
    model_dir = Path(base.base_model_ref)
    if not base.base_model:
        prepare_default(model_dir)
    settings = Settings(base_model=str(model_dir), engine_port=free_port())
    with tempfile.TemporaryDirectory() as tmp:
        lora = make_lora(model_dir, Path(tmp) / "lora", seed=7, scale=0.02, rank=16,
                         modules=MODULES)  # fmt: skip
        log = Path(tmp) / "engine.log"
        stock, stock_answers = side(settings, False, lora, args, log)
        grouped, answers = side(settings, True, lora, args, log)
    figures: dict[str, Any] = {
        "prompts": len(prompts()),
        "max_tokens": args.max_tokens,
        **{f"stock_{k}_s": v for k, v in stock.items()},
        **{f"grouped_{k}_s": v for k, v in grouped.items()},
        "lora_speedup": round(stock["lora"] / grouped["lora"], 2),
        "mixed_speedup": round(stock["mixed"] / grouped["mixed"], 2),
        "identical_lora": agree(stock_answers["lora"], answers["lora"]),
        "identical_mixed_lora": agree(answers["lora"], answers["mixed_lora"]),
        "identical_mixed_base": agree(answers["base"], answers["mixed_base"]),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
