"""Typed configs that one part writes and another reads.

`PairSettings` (the pair builder's knobs, stored with every snapshot), `EvalSettings`
(the evaluator's, RATCHET_EVAL__*) and `TrainConfig` (one training: the API validates
it, a run stores it, the trainer executes it). They live in the core because more
than one stage reads each of them.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class PairSettings(BaseModel):
    pairs_per_prompt: int = Field(
        default=8, ge=1, description="Cap on thumbs pairs per prompt (K), chosen by margin."
    )
    min_answer_tokens: int = Field(
        default=10, ge=0, description="Answers shorter than this are dropped."
    )
    max_prompt_tokens: int = Field(
        default=1024, ge=1, description="Prompts longer than this are dropped."
    )
    held_out_fraction: float = Field(
        default=0.1, ge=0.0, le=0.9, description="Share of prompts (by hash) held out as test."
    )
    models: Literal["current", "all"] = Field(
        default="current",
        description="current: only votes on answers from the production model or the base.",
    )
    max_voter_share: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Most of a snapshot's pairs one voter (key, end user) may make; "
        "1: no cap. Counted against the pairs the other voters make.",
    )
    min_voter_pairs: int = Field(
        default=100,
        ge=0,
        description="A voter may always make this many pairs, whatever the share: small "
        "snapshots from a few honest voters are not cut.",
    )


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


Algorithm = Literal["dpo", "kto", "orpo"]
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: Algorithm = Field(
        default="dpo",
        description="dpo (pairs), kto (unpaired thumbs), orpo (pairs, no reference model).",
    )
    loss_type: list[str] = Field(
        default_factory=lambda: ["sigmoid", "sft"],
        description="TRL DPO loss terms. sigmoid+sft moved greedy style where plain "
        "sigmoid only overfit; ['sigmoid'] is plain DPO.",
    )
    beta: float = Field(default=0.1, gt=0, description="DPO temperature.")
    learning_rate: float = Field(default=2e-5, gt=0, le=1e-2, description="Peak learning rate.")
    epochs: float = Field(default=1.0, gt=0, le=100, description="Passes over the train split.")
    max_steps: int = Field(
        default=-1, ge=-1, description="Stop after this many steps (-1: epochs)."
    )
    batch_size: int = Field(default=4, ge=1, le=512, description="Pairs per device step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int = Field(default=1024, ge=16, description="Tokens per prompt+answer.")
    lora_r: int = Field(default=16, ge=1, le=512, description="LoRA rank.")
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    seed: int = Field(default=42, description="Fixed for reproducible runs.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 on CUDA, fp32 on CPU."
    )
    gradient_checkpointing: bool | None = Field(
        default=None, description="None: on for CUDA, off on CPU (it only costs time there)."
    )
    qlora: bool = Field(default=False, description="4-bit QLoRA via bitsandbytes; CUDA only.")
    precompute_ref_log_probs: bool = Field(
        default=True,
        description="DPO: score the reference (the base, adapter off) once per pair before "
        "training instead of at every step (TRL's default is off). 40 steps of 4 pairs on "
        "CPU: 108 s with a reference forward at every step, 78 s precomputed.",
    )
    min_pairs: int = Field(
        default=8, ge=1, description="Refuse to train on fewer rows (pairs, or KTO rows)."
    )
