"""The evaluator's knobs (RATCHET_EVAL__*); the thresholds live in the policy YAML."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr

DEFAULT_TASKS = ["ratchet_arc_easy", "ratchet_arc_challenge", "ratchet_hellaswag", "ratchet_mmlu"]


class EvalSettings(BaseModel):
    policy_file: Path | None = Field(
        default=None, description="Gate policy YAML. Unset: the shipped eval/policy.yaml."
    )
    tasks: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TASKS),
        description="Offline benchmark tasks (eval/tasks/) scored for both models.",
    )
    extra_tasks: list[str] = Field(
        default_factory=list, description="Standard lm-eval task names; they need the hub."
    )
    items: int = Field(default=300, ge=10, description="Items per offline benchmark.")
    seed: int = Field(default=1234, description="Which items: a fixed, seeded subset.")
    batch_size: int = Field(default=8, ge=1)
    backend: Literal["hf", "vllm"] = Field(
        default="hf", description="lm-eval model: hf (+peft) anywhere, vllm (+LoRA) on GPU."
    )
    diff_max_tokens: int = Field(default=128, ge=1, description="Greedy A/B answer length.")
    diff_concurrency: int = Field(
        default=32, ge=1, description="Greedy requests in flight (vLLM batches them)."
    )
    max_held_out_prompts: int = Field(default=200, ge=0)
    judge_url: str | None = Field(
        default=None, description="OpenAI-compatible endpoint of an LLM judge (optional)."
    )
    judge_model: str | None = None
    judge_api_key: SecretStr | None = None
