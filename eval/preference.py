"""Held-out preference accuracy: does the candidate rank chosen above rejected?

The candidate's ranking is its implicit DPO reward, log pi(y|x) - log pi_base(y|x):
what preference training moves. Production's is its plain log-prob ranking. Both
are computed on the same pairs, so the difference can be tested per pair.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

BATCH = 8


@dataclass(frozen=True)
class HeldOutPair:
    id: str
    prompt: list[dict[str, Any]]
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PairScore:
    """Summed log-probs of chosen (c) and rejected (r) under each model."""

    base_c: float
    base_r: float
    cand_c: float
    cand_r: float
    prod_c: float
    prod_r: float

    @property
    def candidate_correct(self) -> bool:
        return (self.cand_c - self.base_c) > (self.cand_r - self.base_r)

    @property
    def candidate_logprob_correct(self) -> bool:
        return self.cand_c > self.cand_r

    @property
    def production_correct(self) -> bool:
        return self.prod_c > self.prod_r


def score_pairs(
    base_model: str,
    candidate_dir: str,
    production_dir: str | None,
    pairs: Sequence[HeldOutPair],
    on_progress: Callable[[float], None] = lambda _: None,
) -> list[PairScore]:
    """Score every pair under the base, the candidate and production in one model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, candidate_dir, adapter_name="candidate")
    if production_dir is not None:
        model.load_adapter(production_dir, adapter_name="production")
    model.eval()
    texts = [_texts(tokenizer, p) for p in pairs]
    flat = [t for pair in texts for t in (pair[0], pair[1])]

    def logps() -> list[float]:
        return _sequence_logps(model, tokenizer, flat)

    with torch.no_grad():
        with model.disable_adapter():
            base_lp = logps()
        on_progress(1 / 3)
        model.set_adapter("candidate")
        cand_lp = logps()
        on_progress(2 / 3)
        if production_dir is not None:
            model.set_adapter("production")
            prod_lp = logps()
        else:
            prod_lp = base_lp
    on_progress(1.0)
    return [
        PairScore(
            base_lp[2 * i],
            base_lp[2 * i + 1],
            cand_lp[2 * i],
            cand_lp[2 * i + 1],
            prod_lp[2 * i],
            prod_lp[2 * i + 1],
        )
        for i in range(len(pairs))
    ]


def _texts(tokenizer: Any, pair: HeldOutPair) -> tuple[tuple[str, str], tuple[str, str]]:
    """(prompt, prompt + answer) for chosen and rejected, in the chat template."""
    prompt = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)

    def full(answer: str) -> str:
        messages = [*pair.prompt, {"role": "assistant", "content": answer}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False))

    return (prompt, full(pair.chosen)), (prompt, full(pair.rejected))


def _sequence_logps(model: Any, tokenizer: Any, items: list[tuple[str, str]]) -> list[float]:
    """Sum of log-probs of each answer's tokens given its prompt, in padded batches."""
    import torch

    out: list[float] = []
    for start in range(0, len(items), BATCH):
        batch = items[start : start + BATCH]
        prompt_lens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p, _ in batch]
        enc = [tokenizer(f, add_special_tokens=False)["input_ids"] for _, f in batch]
        width = max(len(ids) for ids in enc)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in enc])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in enc])
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_lp = logprobs.gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for row, (n_prompt, x) in enumerate(zip(prompt_lens, enc, strict=True)):
            # Token t is predicted at position t-1: answer tokens are n_prompt..len(x)-1.
            out.append(float(token_lp[row, n_prompt - 1 : len(x) - 1].sum()))
    return out
