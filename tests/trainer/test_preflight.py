"""Preflight refuses adapters vLLM would refuse (or misapply), each for its reason."""

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import make_lora
from trainer.errors import PreflightFailed
from trainer.preflight import preflight

LLAMA = {"architectures": ["LlamaForCausalLM"]}


@pytest.fixture(scope="module")
def good(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(base_model_dir, tmp_path_factory.mktemp("good"), seed=4)


def variant(good: Path, tmp_path: Path, **changes: object) -> Path:
    out = tmp_path / "variant"
    shutil.copytree(good, out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return out


def test_a_plain_lora_passes(good: Path) -> None:
    preflight(good, LLAMA, max_lora_rank=64)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"r": 128}, "max_lora_rank"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "v_proj", "lm_head"]}, "LM head"),
        ({"target_modules": ["q_proj", "v_proj", "rotary"]}, "cannot apply LoRA to rotary"),
        ({"target_modules": "q_proj|v_proj"}, "must be a list"),
        ({"target_modules": ["q_proj"]}, "outside target_modules"),
    ],
)
def test_refusals(good: Path, tmp_path: Path, changes: dict[str, object], problem: str) -> None:
    with pytest.raises(PreflightFailed, match=problem):
        preflight(variant(good, tmp_path, **changes), LLAMA, max_lora_rank=64)


def test_truncated_weights_and_unknown_architecture(good: Path, tmp_path: Path) -> None:
    broken = variant(good, tmp_path)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PreflightFailed, match="does not load"):
        preflight(broken, LLAMA, max_lora_rank=64)
    with pytest.raises(
        PreflightFailed, match="no vLLM LoRA module table for architecture GPT2LMHeadModel"
    ):
        preflight(good, {"architectures": ["GPT2LMHeadModel"]}, max_lora_rank=64)
