"""The one typed training config; every field's description is its help text."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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
    min_pairs: int = Field(
        default=8, ge=1, description="Refuse to train on fewer rows (pairs, or KTO rows)."
    )
