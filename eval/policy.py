"""The gate policy: thresholds from a YAML file, typed and checked when loaded."""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from eval.errors import PolicyError
from ratchet.report import Flag

DEFAULT_POLICY = Path(__file__).with_name("policy.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BenchmarkPolicy(_Strict):
    max_regression: float = Field(default=0.01, gt=0, lt=1)
    # The chance of detecting a regression of max_regression that a benchmark needs
    # to count as informative.
    power: float = Field(default=0.8, gt=0.5, lt=1)
    # Fewer informative benchmarks than this fails the gate.
    min_informative: int = Field(default=0, ge=0)


class PreferencePolicy(_Strict):
    required: bool = True
    min_pairs: int = Field(default=10, ge=1)
    min_gain: float = Field(default=0.0, ge=-1, le=1)


def _flag_limits() -> dict[Flag, float]:
    return {"empty": 0.02, "hit_max_tokens": 0.2, "repetition": 0.1, "refusal": 0.05}


class DiffPolicy(_Strict):
    max_flag_increase: dict[Flag, float] = Field(default_factory=_flag_limits)


class JudgePolicy(_Strict):
    min_win_rate: float = Field(default=0.5, ge=0, le=1)


class Policy(_Strict):
    mode: Literal["review", "auto"] = "review"
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    bootstrap_samples: int = Field(default=2000, ge=100)
    benchmarks: BenchmarkPolicy = Field(default_factory=BenchmarkPolicy)
    preference: PreferencePolicy = Field(default_factory=PreferencePolicy)
    diff: DiffPolicy = Field(default_factory=DiffPolicy)
    judge: JudgePolicy = Field(default_factory=JudgePolicy)


def load_policy(path: Path | None = None) -> Policy:
    path = path or DEFAULT_POLICY
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot read the gate policy {path}: {exc}") from exc
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f"invalid gate policy {path}:\n{exc}") from exc
