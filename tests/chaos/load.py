"""A bounded load of real clients, and a ledger of what the gateway told them.

Each client thread mixes chats, streamed chats, votes, A/B comparisons and choices.
The ledger keeps every answer id a client received and every vote, comparison and
choice that got a 2xx; `check_stored` then looks each of them up in the database.
Every error response is checked as it arrives: OpenAI's error body, `Retry-After`
on 503s, and never a plain-text 500.
"""

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.helpers import auth, query, wait_for

QUESTIONS = ["Name a color.", "Say hi.", "Count to three.", "Name a fruit.", "What is 2+2?"]


@dataclass
class Ledger:
    """What the clients were told, across all threads."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    no_response: int = 0  # connection refused or cut: nothing was acknowledged
    answers: set[str] = field(default_factory=set)  # every completion id a client saw
    # id -> done | error:<code> | broken
    streams: dict[str, str] = field(default_factory=dict)
    stream_text: dict[str, str] = field(default_factory=dict)  # id -> text the client got
    votes: dict[tuple[str, str], int] = field(default_factory=dict)  # (id, user) -> rating
    comparisons: set[str] = field(default_factory=set)
    choices: dict[str, str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    slowest_503_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self) -> int:
        """Responses with a 2xx so far."""
        with self.lock:
            return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    def summary(self, fault: str, lost: int) -> dict[str, Any]:
        ok = self.ok()
        return {
            "fault": fault,
            "sent": self.sent,
            "2xx": ok,
            "503": self.statuses.get(503, 0),
            "other": sum(n for s, n in self.statuses.items() if s >= 300 and s != 503),
            "no_response": self.no_response,
            "lost": lost,
        }


class Load:
    """Client threads against one gateway URL, until `stop()` or `count` requests."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        threads: int = 6,
        seed: int = 0,
        max_tokens: int = 8,
        ledger: Ledger | None = None,
    ) -> None:
        self.url = url
        self.key = key
        self.threads = threads
        self.seed = seed
        self.max_tokens = max_tokens
        self.ledger = ledger or Ledger()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self) -> "Load":
        self._stop.clear()
        self._workers = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()
        return self

    def stop(self) -> Ledger:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=120)
        return self.ledger

    def wait_served(self, more: int, timeout: float = 120) -> None:
        """Until `more` requests more than now have got a 2xx."""
        wanted = self.ledger.ok() + more
        wait_for(lambda: self.ledger.ok() >= wanted, timeout, f"{more} more answers")

    def run(self, seconds: float) -> Ledger:
        self.start()
        time.sleep(seconds)
        return self.stop()

    # -- one client ------------------------------------------------------------

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        mine: list[str] = []  # answers this client may vote on
        pending: list[str] = []  # comparisons this client may choose on
        with httpx.Client(base_url=self.url, headers=auth(self.key), timeout=60) as http:
            while not self._stop.is_set():
                roll = rng.random()
                try:
                    if roll < 0.30:
                        self._chat(http, rng, mine, f"c{index}")
                    elif roll < 0.55:
                        self._stream(http, rng, mine, f"c{index}")
                    elif roll < 0.80 and mine:
                        # Each client is one end user, who votes only on its own
                        # answers; a repeat replaces the vote (the ledger's last wins).
                        self._vote(http, rng, rng.choice(mine), f"c{index}")
                    elif roll < 0.88:
                        self._compare(http, rng, pending, f"c{index}")
                    elif pending:
                        self._choose(http, rng, pending.pop(), f"c{index}")
                except httpx.TransportError:
                    with self.ledger.lock:
                        self.ledger.no_response += 1
                    time.sleep(0.2)  # the gateway is away; do not spin

    def _body(self, rng: random.Random, user: str, **extra: Any) -> dict[str, Any]:
        question = rng.choice(QUESTIONS)
        return {
            "messages": [{"role": "user", "content": question}],
            "max_tokens": self.max_tokens,
            "user": user,
            **extra,
        }

    def _chat(self, http: httpx.Client, rng: random.Random, mine: list[str], user: str) -> None:
        body = self._body(rng, user, model="production")
        response = self._send(http, "/v1/chat/completions", body)
        if response.status_code == 200:
            answer_id = response.json()["id"]
            with self.ledger.lock:
                self.ledger.answers.add(answer_id)
            mine.append(answer_id)

    def _stream(self, http: httpx.Client, rng: random.Random, mine: list[str], user: str) -> None:
        body = self._body(rng, user, model="production", stream=True)
        with self.ledger.lock:
            self.ledger.sent += 1
        started = time.monotonic()
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                self._record(response, time.monotonic() - started)
                return
            with self.ledger.lock:
                self.ledger.statuses[200] += 1
            answer_id, text, outcome = None, [], "broken"
            try:
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[6:]
                    if payload == "[DONE]":
                        outcome = "done"
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        self._check_error_body(chunk, "stream error event")
                        outcome = f"error:{chunk['error'].get('code')}"
                        break
                    if answer_id is None:
                        answer_id = chunk["id"]
                        with self.ledger.lock:
                            self.ledger.answers.add(answer_id)
                    for choice in chunk.get("choices") or []:
                        text.append((choice.get("delta") or {}).get("content") or "")
            except httpx.TransportError:
                outcome = "broken"
            if answer_id is not None:
                with self.ledger.lock:
                    self.ledger.streams[answer_id] = outcome
                    self.ledger.stream_text[answer_id] = "".join(text)
                if outcome == "done":
                    mine.append(answer_id)

    def _vote(self, http: httpx.Client, rng: random.Random, answer_id: str, user: str) -> None:
        rating = rng.choice(["up", "down"])
        body = {"completion_id": answer_id, "rating": rating, "user": user}
        if self._send(http, "/v1/feedback", body).status_code == 200:
            with self.ledger.lock:
                self.ledger.votes[(answer_id, user)] = 1 if rating == "up" else -1

    def _compare(
        self, http: httpx.Client, rng: random.Random, pending: list[str], user: str
    ) -> None:
        response = self._send(http, "/v1/comparisons", self._body(rng, user))
        if response.status_code == 200:
            comparison_id = response.json()["id"]
            with self.ledger.lock:
                self.ledger.comparisons.add(comparison_id)
            pending.append(comparison_id)

    def _choose(self, http: httpx.Client, rng: random.Random, comparison: str, user: str) -> None:
        choice = rng.choice(["a", "b", "tie", "both_bad"])
        body = {"choice": choice, "user": user}
        if self._send(http, f"/v1/comparisons/{comparison}/choice", body).status_code == 200:
            with self.ledger.lock:
                self.ledger.choices[comparison] = choice

    def _send(self, http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
        with self.ledger.lock:
            self.ledger.sent += 1
        started = time.monotonic()
        response = http.post(path, json=body)
        self._record(response, time.monotonic() - started)
        return response

    def _record(self, response: httpx.Response, seconds: float) -> None:
        with self.ledger.lock:
            self.ledger.statuses[response.status_code] += 1
            if response.status_code == 503:
                self.ledger.slowest_503_s = max(self.ledger.slowest_503_s, seconds)
        if response.status_code < 400:
            return
        try:
            body = response.json()
        except ValueError:
            self._violation(f"{response.status_code} without a JSON body: {response.text[:200]}")
            return
        self._check_error_body(body, f"{response.status_code}")
        if response.status_code == 503 and not response.headers.get("retry-after"):
            self._violation(f"503 without Retry-After: {body}")
        if response.status_code == 500:
            self._violation(f"500: {body}")

    def _check_error_body(self, body: Any, what: str) -> None:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
            self._violation(f"{what} not in OpenAI's error shape: {body}")

    def _violation(self, what: str) -> None:
        with self.ledger.lock:
            self.ledger.violations.append(what)


def _uuid(public_id: str) -> str:
    return public_id.split("-", 1)[1]


def check_stored(ledger: Ledger, database_url: str) -> list[str]:
    """Everything acknowledged that the database does not hold; [] when nothing is lost."""
    lost: list[str] = []
    ids = [_uuid(a) for a in ledger.answers]
    rows = query(
        database_url,
        "SELECT id::text, status, output FROM completions WHERE id = ANY(%s::uuid[])",
        ids,
    )
    found = {r["id"].replace("-", ""): r for r in rows}
    lost += [f"answer {a}" for a in ledger.answers if _uuid(a) not in found]
    for answer_id, text in ledger.stream_text.items():
        row = found.get(_uuid(answer_id))
        outcome = ledger.streams[answer_id]
        if row is None or outcome == "broken":
            continue  # a broken connection: the row may be either, but it must exist
        if outcome == "error:storage_unavailable":
            # Its end could not be written anywhere (the client was told): swept later.
            if row["status"] != "aborted":
                lost.append(f"stream {answer_id} ({outcome}) is {row['status']}")
            continue
        wanted = "complete" if outcome == "done" else "aborted"
        if row["status"] != wanted or row["output"] != text:
            lost.append(f"stream {answer_id} ({outcome}) is {row['status']}: {row['output']!r}")
    votes = {
        (r["completion_id"].replace("-", ""), r["end_user"]): r["rating"]
        for r in query(
            database_url,
            "SELECT completion_id::text, end_user, rating FROM votes WHERE end_user = ANY(%s)",
            [user for _, user in ledger.votes],
        )
    }
    for (answer_id, user), rating in ledger.votes.items():
        if votes.get((_uuid(answer_id), user)) != rating:
            lost.append(f"vote {user} on {answer_id}")
    comparisons = {
        r["id"].replace("-", ""): r["choice"]
        for r in query(
            database_url,
            "SELECT id::text, choice FROM comparisons WHERE id = ANY(%s::uuid[])",
            [_uuid(c) for c in ledger.comparisons],
        )
    }
    lost += [f"comparison {c}" for c in ledger.comparisons if _uuid(c) not in comparisons]
    for comparison, choice in ledger.choices.items():
        if comparisons.get(_uuid(comparison)) != choice:
            lost.append(f"choice {choice} on {comparison}")
    return lost


def unfinished(database_url: str) -> dict[str, int]:
    """Rows a fault must not leave behind: streams still `streaming`, and evaluations
    or runs `queued` with no job in the queue."""
    row = query(
        database_url,
        "SELECT (SELECT count(*) FROM completions WHERE status = 'streaming') AS streaming,"
        " (SELECT count(*) FROM evaluations e WHERE status = 'queued' AND NOT EXISTS ("
        "   SELECT 1 FROM procrastinate_jobs j WHERE j.status IN ('todo', 'doing')"
        "   AND j.args->>'evaluation_id' = e.id::text)) AS evaluations_without_job,"
        " (SELECT count(*) FROM runs r WHERE status = 'queued' AND NOT EXISTS ("
        "   SELECT 1 FROM procrastinate_jobs j WHERE j.status IN ('todo', 'doing')"
        "   AND j.args->>'run_id' = r.id::text)) AS runs_without_job",
    )[0]
    return {k: int(v) for k, v in row.items()}
