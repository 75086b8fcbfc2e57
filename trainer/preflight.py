"""Checks an adapter against what vLLM will accept, before it is registered.

vLLM refuses some adapters only when they are loaded (or worse, at request time):
modules it cannot apply LoRA to, ranks over `max_lora_rank`, `modules_to_save`,
adapters on the embeddings or the LM head. Catching those here keeps a bad adapter
out of the registry altogether.
"""

import json
from pathlib import Path
from typing import Any

from trainer.errors import PreflightFailed

# Modules vLLM applies LoRA to, per architecture (vLLM's packed_modules_mapping plus
# the plain projections of these decoder-only models).
_DECODER = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
SUPPORTED_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _DECODER,
    "MistralForCausalLM": _DECODER,
    "Qwen2ForCausalLM": _DECODER,
    "Qwen3ForCausalLM": _DECODER,
}
_FORBIDDEN = ("lm_head", "embed_tokens", "wte", "embed_out")


def preflight(adapter_dir: Path, base_config: dict[str, Any], max_lora_rank: int) -> None:
    """Raise PreflightFailed listing every problem; return quietly when there is none."""
    problems: list[str] = []
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    rank = config.get("r")
    if not isinstance(rank, int) or rank > max_lora_rank:
        problems.append(f"rank {rank} is over the engine's max_lora_rank {max_lora_rank}")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} is not supported by vLLM")
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        problems.append(f"target_modules must be a list of names, not {targets!r}")
        targets = []
    problems += _module_problems(set(targets), base_config)
    problems += _weight_problems(adapter_dir / "adapter_model.safetensors", set(targets))
    if problems:
        raise PreflightFailed(problems)


def _module_problems(targets: set[str], base_config: dict[str, Any]) -> list[str]:
    problems = [
        f"adapts {t}, an embedding or LM head"
        for t in sorted(targets)
        if any(f in t for f in _FORBIDDEN)
    ]
    architectures = base_config.get("architectures") or ["?"]
    supported = SUPPORTED_MODULES.get(architectures[0])
    if supported is None:
        problems.append(f"no vLLM LoRA module table for architecture {architectures[0]}")
    elif unsupported := sorted(targets - supported):
        problems.append(f"vLLM cannot apply LoRA to {', '.join(unsupported)} on {architectures[0]}")
    return problems


def _weight_problems(weights: Path, targets: set[str]) -> list[str]:
    from safetensors import safe_open

    if not weights.is_file():
        return [f"{weights.name} is missing"]
    try:
        with safe_open(str(weights), framework="pt") as fh:
            keys = list(fh.keys())
            for key in keys:
                fh.get_tensor(key)  # reads every tensor: truncated files fail here
    except Exception as exc:  # safetensors raises its own error types
        return [f"{weights.name} does not load: {exc}"]
    stray = [k for k in keys if "lora_A" not in k and "lora_B" not in k]
    unknown = [k for k in keys if not any(f".{t}." in k for t in targets)]
    problems = []
    if stray:
        problems.append(f"non-LoRA tensors in the weights: {stray[:3]}")
    if unknown:
        problems.append(f"tensors for modules outside target_modules: {unknown[:3]}")
    if not keys:
        problems.append("the weights file holds no tensors")
    return problems
