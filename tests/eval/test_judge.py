"""The optional LLM judge: positions swapped, verdicts that survive the swap, and a real
OpenAI-compatible endpoint (the session's vLLM engine) as the judge."""

import json
from collections.abc import Callable

import httpx
import pytest

from eval import gate, greedy
from eval.errors import JudgeError
from eval.judge import Judge, judge_all
from eval.policy import Policy
from ratchet.report import Answer, DiffItem
from tests.helpers import Gateway

GOOD, BAD = "Paris is the capital of France.", "France is a country, maybe Lyon."


def items(n: int = 4) -> list[DiffItem]:
    prompts = [greedy.Prompt("regression", [{"role": "user", "content": "Capital of France?"}])]
    prompts *= n
    good = [Answer(text=GOOD, finish_reason="stop", tokens=7)] * n
    bad = [Answer(text=BAD, finish_reason="stop", tokens=8)] * n
    return greedy.compare(prompts, bad, good)  # production bad, candidate good


def judge_with(reply: Callable[[str], str]) -> Judge:
    def handle(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["messages"][0]["content"]
        return httpx.Response(200, json={"choices": [{"message": {"content": reply(prompt)}}]})

    return Judge("http://judge.invalid", "fake", transport=httpx.MockTransport(handle))


def test_a_judge_that_always_picks_the_first_answer_yields_only_ties() -> None:
    verdicts = judge_all(judge_with(lambda _: "A"), items())
    assert verdicts == ["tie"] * 4
    result = gate.judge("fake", verdicts, Policy())
    assert result.win_rate == 0.5 and result.ties == 4


def test_a_consistent_judge_counts_wins_in_both_orders() -> None:
    def prefers_paris(prompt: str) -> str:
        a = prompt.split("Answer A:")[1].split("Answer B:")[0]
        return "A" if "Paris" in a else "B"

    verdicts = judge_all(judge_with(prefers_paris), items())
    assert verdicts == ["candidate"] * 4
    result = gate.judge("fake", verdicts, Policy())
    decision = gate.decide(Policy(), [], None, greedy.summarize(items()), result)
    assert next(c for c in decision.criteria if c.name == "judge").passed


def test_a_failing_judge_is_a_clear_error() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="down")

    judge = Judge("http://judge.invalid", "fake", transport=httpx.MockTransport(broken))
    with pytest.raises(JudgeError, match="judge.invalid"):
        judge_all(judge, items(1))


def test_the_running_engine_as_a_judge(gateway: Gateway) -> None:
    assert gateway.engine_url
    engine_model = httpx.get(gateway.engine_url + "/v1/models").json()["data"][0]["id"]
    judge = Judge(gateway.engine_url, engine_model)
    try:
        verdicts = judge_all(judge, items(2))
        raw = judge.ask("Capital of France?", GOOD, BAD)
    finally:
        judge.close()
    assert set(verdicts) <= {"candidate", "production", "tie"} and len(verdicts) == 2
    assert raw in {"A", "B", "TIE"}
