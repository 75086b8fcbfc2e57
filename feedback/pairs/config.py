"""The knobs of the pair builder; stored with every snapshot."""

from typing import Literal

from pydantic import BaseModel, Field


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
