"""The greedy A/B diff through vLLM vs the same diff with HF `generate`, in one run.

    .venv/bin/python bench/greedy_diff.py [--prompts 100] [--max-tokens 64]

Both sides answer the same prompts at temperature 0 with the same `max_tokens`, for
the base model (production) and a LoRA on it (candidate), which is what an
evaluation does. vLLM gets the requests `--concurrency` at a time (the evaluator's
`RATCHET_EVAL__DIFF_CONCURRENCY`), after a short warm-up; HF `generate` gets
left-padded batches of the same size with the PEFT adapter switched off and on.

The last line of output is one JSON object: seconds per side, the speed ratio
(HF seconds / vLLM seconds; target >= 3) and how often the two agree exactly.
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eval import greedy  # noqa: E402
from ratchet.db import database_url  # noqa: E402
from ratchet.engine import EngineClient  # noqa: E402
from ratchet.model import prepare_default  # noqa: E402
from ratchet.settings import Settings  # noqa: E402
from tests.helpers import free_port, make_lora, start_gateway  # noqa: E402

TOPICS = [
    "volcanoes", "honey", "lighthouses", "glaciers", "owls", "bridges", "tea", "chess",
    "rainbows", "deserts", "bees", "trains", "whales", "castles", "pianos", "comets",
    "otters", "maps", "lanterns", "clouds",
]  # fmt: skip
ASKS = ["Tell me about {}.", "Write two sentences about {}.", "Why do people like {}?",
        "Give me a fun fact about {}."]  # fmt: skip


def prompts(n: int) -> list[greedy.Prompt]:
    found = greedy.regression_prompts()
    for ask in ASKS:
        for topic in TOPICS:
            found.append(
                greedy.Prompt("held_out", [{"role": "user", "content": ask.format(topic)}])
            )
    if len(found) < n:
        raise SystemExit(f"only {len(found)} prompts available")
    return found[:n]


async def vllm_side(
    url: str, names: list[str], items: list[greedy.Prompt], max_tokens: int, concurrency: int
) -> tuple[float, list[list[str]]]:
    engine = EngineClient(url)
    try:
        started = time.perf_counter()
        # As the gate does: both models under one limit, so the engine batches them together.
        limit = asyncio.Semaphore(concurrency)
        answered = await asyncio.gather(
            *(greedy.answer_all(engine, name, items, max_tokens, limit) for name in names)
        )
        return time.perf_counter() - started, [[a.text for a in answers] for answers in answered]
    finally:
        await engine.aclose()


def hf_side(
    model_dir: Path, lora: Path, items: list[greedy.Prompt], max_tokens: int, batch: int
) -> tuple[float, list[list[str]]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(lora)).eval()
    texts = [
        tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
        for p in items
    ]

    def generate() -> list[str]:
        out: list[str] = []
        for start in range(0, len(texts), batch):
            enc = tokenizer(texts[start : start + batch], return_tensors="pt", padding=True,
                            add_special_tokens=False)  # fmt: skip
            with torch.no_grad():
                ids = model.generate(
                   **enc, do_sample=False, max_new_tokens=max_tokens,
                                     pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            new = ids[:, enc["input_ids"].shape[1] :]
            out += [str(tokenizer.decode(row, skip_special_tokens=True)).strip() for row in new]
        return out

    started = time.perf_counter()
    with model.disable_adapter():
        production = generate()
    candidate = generate()
    return time.perf_counter() - started, [production, candidate]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="ABAB rounds per side")
    args = parser.parse_args()

    settings = Settings()
    model_dir = Path(settings.base_model_ref)
    if not settings.base_model:
        prepare_default(model_dir)
    items = prompts(args.prompts)
    with database_url(settings) as conninfo, tempfile.TemporaryDirectory() as tmp:
        from ratchet.migrate import migrate

        migrate(conninfo)
        # The shape the trainer makes by default: rank 16 on the attention projections.
        modules = ("q_proj", "k_proj", "v_proj", "o_proj")
        lora = make_lora(model_dir, Path(tmp) / "lora", seed=7, scale=0.02, rank=16,
                         modules=modules)  # fmt: skip
        engine_port = free_port()
        env = {
            "RATCHET_DATA_DIR": str(settings.data_dir),
            "RATCHET_ENGINE_PORT": str(engine_port),
            "RATCHET_BASE_MODEL": str(model_dir),
        }
        if not os.environ.get("DATABASE_URL"):
            env["DATABASE_URL"] = conninfo
        gw = start_gateway(env, Path(tmp) / "serve.log")
        try:
            figures = measure(args, f"http://127.0.0.1:{engine_port}", model_dir, lora, items)
        finally:
            gw.stop()
    print(json.dumps(figures))


def measure(
    args: argparse.Namespace, url: str, model_dir: Path, lora: Path, items: list[greedy.Prompt]
) -> dict[str, Any]:
    async def setup() -> str:
        engine = EngineClient(url)
        try:
            await greedy.ensure_loaded(engine, "bench-lora", str(lora))
            return str([m["id"] for m in await engine.models() if not m.get("parent")][0])
        finally:
            await engine.aclose()

    base_name = asyncio.run(setup())
    # A long-running engine is warm: the first batches of each shape (and the LoRA path)
    # are slow once, and that is not what an evaluation meets.
    asyncio.run(vllm_side(url, [base_name, "bench-lora"], items[:16], 8, args.concurrency))
    vllm_s: list[float] = []
    hf_s: list[float] = []
    for _ in range(args.rounds):
        seconds, vllm_out = asyncio.run(
            vllm_side(url, [base_name, "bench-lora"], items, args.max_tokens, args.concurrency)
        )
        vllm_s.append(seconds)
        print(f"vLLM: {2 * len(items)} answers in {seconds:.1f} s", file=sys.stderr)
        seconds, hf_out = hf_side(model_dir, lora, items, args.max_tokens, args.concurrency)
        hf_s.append(seconds)
        print(f"HF generate: {2 * len(items)} answers in {seconds:.1f} s", file=sys.stderr)
    same = [
        sum(a.strip() == b.strip() for a, b in zip(v, h, strict=True)) / len(items)
        for v, h in zip(vllm_out, hf_out, strict=True)
    ]
    return {
        "prompts": len(items),
        "max_tokens": args.max_tokens,
        "vllm_s": round(sum(vllm_s) / len(vllm_s), 2),
        "hf_generate_s": round(sum(hf_s) / len(hf_s), 2),
        "speed_ratio": round(sum(hf_s) / sum(vllm_s), 2),
        "identical_base": round(same[0], 3),
        "identical_lora": round(same[1], 3),
    }


if __name__ == "__main__":
    main()
