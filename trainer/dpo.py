"""DPO-LoRA with TRL + PEFT: real training, on GPU in production and on CPU in tests."""

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from trainer.config import TrainConfig

PAIR_COLUMNS = ["prompt", "chosen", "rejected"]


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    wall_s: float
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def train_dpo(
    base_model: str,
    data: DatasetDict,
    config: TrainConfig,
    work_dir: Path,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train a LoRA on `data['train']`, evaluate on `data['test']`, save to work_dir/adapter."""
    import torch  # heavy imports only when training
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    cuda = torch.cuda.is_available()
    bf16 = config.precision == "bf16" or (config.precision == "auto" and cuda)
    checkpointing = cuda if config.gradient_checkpointing is None else config.gradient_checkpointing
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=torch.bfloat16 if bf16 else torch.float32
    )
    args = DPOConfig(
        output_dir=str(work_dir / "trainer"),
        # TRL 1.16 defaults to bf16, gradient checkpointing and lr 1e-6: set them all.
        bf16=bf16,
        gradient_checkpointing=checkpointing,
        learning_rate=config.learning_rate,
        beta=config.beta,
        loss_type=list(config.loss_type),
        max_length=config.max_length,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        disable_tqdm=True,
    )
    test = data["test"].select_columns(PAIR_COLUMNS) if data["test"].num_rows else None
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data["train"].select_columns(PAIR_COLUMNS),
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
