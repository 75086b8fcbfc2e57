"""An optional LLM judge: any OpenAI-compatible endpoint compares the two greedy
answers to each prompt, twice, with their positions swapped.

A verdict counts only when it survives the swap; a judge that always prefers the
first answer (a known bias) therefore produces ties, not wins.
"""

import re
from collections.abc import Sequence
from typing import Literal

import httpx

from eval.errors import JudgeError
from ratchet.report import DiffItem

Verdict = Literal["candidate", "production", "tie"]

PROMPT = """You compare two answers to the same user request.

Request:
{prompt}

Answer A:
{a}

Answer B:
{b}

Which answer is more helpful, correct and clear? Reply with exactly one of: A, B, TIE."""

_CHOICE = re.compile(r"\b(A|B|TIE)\b")


class Judge:
    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=120, transport=transport
        )

    def close(self) -> None:
        self.http.close()

    def ask(self, prompt: str, a: str, b: str) -> str:
        """'A', 'B' or 'TIE' (anything unreadable counts as TIE)."""
        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": PROMPT.format(prompt=prompt, a=a, b=b)}],
        }
        try:
            response = self.http.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            text = response.json()["choices"][0]["message"]["content"] or ""
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise JudgeError(f"the judge at {self.http.base_url} failed: {exc}") from exc
        match = _CHOICE.search(text.upper())
        return match.group(1) if match else "TIE"

    def compare(self, item: DiffItem) -> Verdict:
        if item.identical:
            return "tie"
        first = self.ask(item.prompt, item.candidate.text, item.production.text)
        second = self.ask(item.prompt, item.production.text, item.candidate.text)
        if first == "A" and second == "B":
            return "candidate"
        if first == "B" and second == "A":
            return "production"
        return "tie"


def score(verdict: Verdict) -> float:
    return {"candidate": 1.0, "production": 0.0, "tie": 0.5}[verdict]


def judge_all(judge: Judge, items: Sequence[DiffItem]) -> list[Verdict]:
    return [judge.compare(item) for item in items]
