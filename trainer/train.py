"""Preference training with TRL + PEFT: DPO, KTO or ORPO on a LoRA, QLoRA on CUDA.

Real training, on GPU in production and on CPU in tests. DPO and ORPO read a
snapshot's pairs (prompt, chosen, rejected); KTO its unpaired rows (prompt,
completion, label). All three share one LoRA config and one set of arguments.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from ratchet.config import TrainConfig
from trainer.errors import InvalidTrainConfig

COLUMNS = {
    "dpo": ["prompt", "chosen", "rejected"],
    "orpo": ["prompt", "chosen", "rejected"],
    "kto": ["prompt", "completion", "label"],
}


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    wall_s: float
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def data_kind(config: TrainConfig) -> str:
    """Which of a snapshot's datasets the algorithm reads: `pairs` or `kto`."""
    return "kto" if config.algorithm == "kto" else "pairs"


def train(
    base_model: str,
    data: DatasetDict,
    config: TrainConfig,
    work_dir: Path,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train a LoRA on `data['train']`, evaluate on `data['test']`, save to work_dir/adapter."""
    import torch  # heavy imports only when training
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    cuda = torch.cuda.is_available()
    if config.qlora and not cuda:
        raise InvalidTrainConfig("qlora: 4-bit QLoRA (bitsandbytes) needs a CUDA device")
    bf16 = config.precision == "bf16" or (config.precision == "auto" and cuda)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    columns = COLUMNS[config.algorithm]
    test = data["test"].select_columns(columns) if data["test"].num_rows else None
    trainer_cls, args = _algorithm(config, work_dir, cuda, bf16)
    trainer = trainer_cls(
        model=_model(base_model, config, bf16),
        args=args,
        train_dataset=data["train"].select_columns(columns),
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
            task_type="CAUSAL_LM",
        ),
        callbacks=list(callbacks),
    )
    # Our callbacks report progress; TRL's printer would write every log dict to stdout.
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    output = trainer.train()
    eval_metrics = {k: float(v) for k, v in trainer.evaluate().items()} if test else {}
    wall = time.perf_counter() - started
    adapter_dir = work_dir / "adapter"
    peft_model: Any = trainer.model  # a PeftModel; typed loosely by transformers
    peft_model.save_pretrained(str(adapter_dir))
    return TrainResult(
        adapter_dir=adapter_dir,
        steps=int(output.global_step),
        wall_s=wall,
        train_metrics={k: float(v) for k, v in output.metrics.items()},
        eval_metrics=eval_metrics,
        history=list(trainer.state.log_history),
    )


def _model(base_model: str, config: TrainConfig, bf16: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if bf16 else torch.float32
    if not config.qlora:
        return AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    import peft
    import transformers

    # Both untyped; reached only on CUDA machines with the `gpu` extra (bitsandbytes).
    quantization: Any = transformers.BitsAndBytesConfig
    prepare: Any = peft.prepare_model_for_kbit_training
    quantized = AutoModelForCausalLM.from_pretrained(
        base_model,
        dtype=dtype,
        quantization_config=quantization(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        ),
    )
    return prepare(quantized)


def _algorithm(config: TrainConfig, work_dir: Path, cuda: bool, bf16: bool) -> tuple[Any, Any]:
    """The TRL trainer class and its arguments for the configured algorithm."""
    common: dict[str, Any] = {
        "output_dir": str(work_dir / "trainer"),
        # TRL 1.16 defaults to bf16, gradient checkpointing and lr 1e-6: set them all.
        "bf16": bf16,
        "gradient_checkpointing": (
            cuda if config.gradient_checkpointing is None else config.gradient_checkpointing
        ),
        "learning_rate": config.learning_rate,
        "beta": config.beta,
        "max_length": config.max_length,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "use_cpu": not cuda,
        "disable_tqdm": True,
    }
    if config.algorithm == "kto":
        from trl.trainer.kto_config import KTOConfig
        from trl.trainer.kto_trainer import KTOTrainer

        return KTOTrainer, KTOConfig(**common)
    if config.algorithm == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig(**common, remove_unused_columns=False)
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    return DPOTrainer, DPOConfig(
        **common,
        loss_type=list(config.loss_type),
        # TRL 1.16 defaults to False: a reference forward at every step.
        precompute_ref_log_probs=config.precompute_ref_log_probs,
    )
