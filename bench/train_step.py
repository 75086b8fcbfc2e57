"""DPO-LoRA step time on SmolLM2: fp32 vs bf16, side by side in one run.

    .venv/bin/python bench/train_step.py [--steps 8] [--batch-size 4]

Trains the default LoRA (r=16, all projections, sigmoid+sft loss) for a few steps
on a synthetic style set of 64 pairs, once per precision, and reports seconds per
step and tokens per second from TRL's own counters (model loading excluded). On a
CUDA machine it runs the same on the GPU. The last line is one JSON object.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datasets import Dataset, DatasetDict  # noqa: E402

from ratchet.config import TrainConfig  # noqa: E402
from ratchet.model import prepare_default  # noqa: E402
from ratchet.settings import Settings  # noqa: E402
from trainer.train import train  # noqa: E402


def style_pairs(n: int) -> DatasetDict:
    rows = []
    for i in range(n):
        topic = f"topic number {i}"
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Tell me about {topic}."}],
                "chosen": [{"role": "assistant", "content": f"Short answer: {topic} matters."}],
                "rejected": [
                    {
                        "role": "assistant",
                        "content": "Well, there is a great deal one "
                        f"could say about {topic}, and it depends on many things. " * 3,
                    }
                ],
            }
        )
    return DatasetDict(train=Dataset.from_list(rows), test=Dataset.from_list(rows[:0]))


def measure(base: str, precision: str, steps: int, batch: int) -> dict[str, float]:
    config = TrainConfig(precision=precision, max_steps=steps, batch_size=batch, max_length=512)
    with tempfile.TemporaryDirectory() as work:
        result = train(base, style_pairs(64), config, Path(work))
    runtime = result.train_metrics["train_runtime"]
    tokens = max(float(h.get("num_tokens", 0)) for h in result.history)
    return {
        "s_per_step": round(runtime / result.steps, 2),
        "tokens_per_s": round(tokens / runtime, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    import torch

    settings = Settings()
    if not settings.base_model:
        prepare_default(settings.default_base_model_dir)
    figures: dict[str, Any] = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "steps": args.steps,
        "batch_size": args.batch_size,
    }
    for precision in ("fp32", "bf16"):
        result = measure(settings.base_model_ref, precision, args.steps, args.batch_size)
        print(f"{precision}: {result}", flush=True)
        figures.update({f"{precision}_{k}": v for k, v in result.items()})
    figures["bf16_speedup"] = round(
        float(figures["fp32_s_per_step"]) / float(figures["bf16_s_per_step"]), 2
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
