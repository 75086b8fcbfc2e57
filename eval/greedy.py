"""The greedy A/B diff: both models answer the same prompts at temperature 0 through
the running vLLM engine, and every pair of answers is compared."""

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval import answers
from eval.errors import EngineNotReady
from ratchet.engine import EngineClient, EngineRejected, EngineUnavailable
from ratchet.report import FLAGS, Answer, DiffItem, DiffSummary, FlagRate

REGRESSION_PROMPTS = Path(__file__).with_name("prompts") / "regression.jsonl"


@dataclass(frozen=True)
class Prompt:
    source: str  # "held_out" or "regression"
    messages: list[dict[str, Any]]

    @property
    def text(self) -> str:
        return str(self.messages[-1]["content"])


def regression_prompts(path: Path = REGRESSION_PROMPTS) -> list[Prompt]:
    lines = path.read_text().splitlines()
    return [Prompt("regression", json.loads(line)["messages"]) for line in lines if line.strip()]


async def ensure_loaded(engine: EngineClient, name: str, path: str) -> None:
    """Load an adapter unless the engine has it already (a gateway may have loaded it)."""
    try:
        listed = {m["id"] for m in await engine.models()}
        if name not in listed:
            await engine.load_adapter(name, path)
    except EngineUnavailable as exc:
        raise EngineNotReady(f"the vLLM engine at {engine.base_url} is not reachable") from exc
    except EngineRejected as exc:
        if "already" not in exc.message:
            raise EngineNotReady(f"the engine refused adapter {name}: {exc.message}") from exc


async def answer_all(
    engine: EngineClient,
    model: str,
    prompts: Sequence[Prompt],
    max_tokens: int,
    limit: asyncio.Semaphore,
) -> list[Answer]:
    """Every prompt answered by `model`; `limit` bounds the requests in flight (one
    semaphore for both models lets the engine batch their requests together)."""

    async def one(i: int, prompt: Prompt) -> Answer:
        async with limit:
            body = {
                "model": model,
                "messages": prompt.messages,
                "temperature": 0,
                "max_tokens": max_tokens,
            }
            try:
                result = await engine.chat(body, f"eval-{model}-{i}")
            except EngineUnavailable as exc:
                raise EngineNotReady(f"the engine went away: {exc}") from exc
        choice = result["choices"][0]
        text = choice["message"].get("content") or ""
        return Answer(
            text=text,
            finish_reason=choice.get("finish_reason"),
            tokens=int(result.get("usage", {}).get("completion_tokens", 0)),
            flags=answers.flags(text, choice.get("finish_reason")),
        )

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def compare(prompts: Sequence[Prompt], prod: list[Answer], cand: list[Answer]) -> list[DiffItem]:
    return [
        DiffItem(
            source="held_out" if p.source == "held_out" else "regression",
            prompt=p.text,
            production=a,
            candidate=b,
            identical=a.text == b.text,
            length_ratio=answers.length_ratio(a.text, b.text),
            diff=answers.char_diff(a.text, b.text),
        )
        for p, a, b in zip(prompts, prod, cand, strict=True)
    ]


def summarize(items: Sequence[DiffItem]) -> DiffSummary:
    n = len(items)

    def rate(side: str, flag: str) -> float:
        return sum(flag in getattr(i, side).flags for i in items) / n if n else 0.0

    return DiffSummary(
        n=n,
        identical=sum(i.identical for i in items) / n if n else 0.0,
        mean_length_ratio=sum(i.length_ratio for i in items) / n if n else 0.0,
        flags={
            f: FlagRate(production=rate("production", f), candidate=rate("candidate", f))
            for f in FLAGS
        },
    )
