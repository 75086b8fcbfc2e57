"""Vote ingest: single votes and batches through a real `ratchet serve`.

    .venv/bin/python bench/vote_ingest.py [--engine-url URL] [--seconds 10]

Creates a scratch database on the configured server (DATABASE_URL, default the local
test server) and a chat key whose quotas do not bind, starts `ratchet serve` on it
(with its own vLLM engine, or the running one at `--engine-url` / RATCHET_ENGINE_URL),
makes `--answers` real answers through the chat API (1 token each), then sends votes
from `--clients` concurrent keep-alive connections of a lean asyncio HTTP/1.1 client
in this process: single votes (`POST /v1/feedback`) for `--seconds`, then batches of
`--batch` (`POST /v1/feedback/batch`) for as long.

Every vote is a distinct (answer, end user) pair, so that each acknowledged vote must
be its own row: the gateway runs with `votes_per_answer: any` (every end user of the
key may vote on its answers) and `--users` end users each vote on every answer at most
once; that stays under the default day cap of 500 per voter (which is checked, as in
production) as long as answers <= 500. Afterwards the votes table is counted:
acknowledged (items answered 200) vs stored rows.

`yardstick_s` is a fixed Python workload timed before and after the run (see
`yardstick`): the machine's speed for this kind of work drifts. The last line of
output is one JSON object of the figures, with the CPU time per
acknowledged vote in each phase of the gateway, of the scratch database's Postgres
backends and of this process (the load generator): where a vote's cost goes, apart
from the share of the machine each got.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ratchet.keys import Limits  # noqa: E402
from ratchet.model import prepare_default  # noqa: E402
from ratchet.settings import Settings  # noqa: E402
from tests.helpers import free_port, fresh_database, make_key, query, start_gateway  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"


class Client:
    """One keep-alive HTTP/1.1 connection: a request at a time, no parsing beyond the
    status line and Content-Length (httpx costs more CPU than the server here)."""

    def __init__(self, host: str, port: int, secret: str) -> None:
        self.host, self.port = host, port
        self.head = (
            f"Host: {host}:{port}\r\nAuthorization: Bearer {secret}\r\n"
            "Content-Type: application/json\r\n"
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            b"POST "
            + path.encode()
            + b" HTTP/1.1\r\n"
            + self.head
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (Linux /proc): the gateway's cost per vote,
    which a busy machine inflates far less than it depresses the throughput."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backends(db: str) -> list[int]:
    """The Postgres backends serving the scratch database (the gateway's pool)."""
    rows = query(
        db,
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    return [int(r["pid"]) for r in rows]


def postgres_cpu(db: str, before: dict[int, float] | None = None) -> dict[int, float]:
    """CPU seconds of each backend of the scratch database (a backend gone meanwhile
    is not counted; one started meanwhile counts from zero)."""
    out: dict[int, float] = {}
    for pid in backends(db):
        try:
            out[pid] = cpu_seconds(pid)
        except OSError:
            continue
    return out


def spent(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def pairs(answers: list[str], users: int, start: int = 0) -> Iterator[tuple[str, str]]:
    """Distinct (answer, end user) pairs; neighbours have different users, so that
    concurrent votes rarely wait on the same voter's lock."""
    for i in range(start, len(answers) * users):
        yield answers[i // users], f"user-{i % users}"


def vote(answer: str, user: str, n: int) -> dict[str, object]:
    return {"completion_id": answer, "rating": "up" if n % 3 else "down", "user": user}


async def single_phase(
    url: str, secret: str, todo: Iterator[tuple[str, str]], clients: int, seconds: float
) -> dict[str, object]:
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        client = Client(host, int(port), secret)
        n = 0
        try:
            while time.perf_counter() < deadline:
                answer, user = next(todo)
                body = json.dumps(vote(answer, user, n)).encode()
                started = time.perf_counter()
                status, _ = await client.post("/v1/feedback", body)
                latencies.append(time.perf_counter() - started)
                statuses[status] += 1
                n += 1
        finally:
            client.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "votes_per_s": statuses[200] / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "acknowledged": statuses[200],
        "statuses": dict(statuses),
    }


async def batch_phase(
    url: str, secret: str, todo: Iterator[tuple[str, str]], clients: int, seconds: float, size: int
) -> dict[str, object]:
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        client = Client(host, int(port), secret)
        try:
            while time.perf_counter() < deadline:
                items = [vote(a, u, n) for n, (a, u) in zip(range(size), todo, strict=False)]
                body = json.dumps({"votes": items}).encode()
                started = time.perf_counter()
                status, answer = await client.post("/v1/feedback/batch", body)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    statuses[status] += len(items)
                    continue
                for item in json.loads(answer)["data"]:
                    statuses[item["status"]] += 1
        finally:
            client.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "votes_per_s": statuses[200] / wall,
        "batch_p50_ms": statistics.median(latencies) * 1000,
        "batch_p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "acknowledged": statuses[200],
        "statuses": dict(statuses),
    }


def per_vote(seconds: float, phase: dict[str, object]) -> float:
    acknowledged = phase["acknowledged"]
    assert isinstance(acknowledged, int)
    return round(1000 * seconds / max(1, acknowledged), 3)


def make_answers(url: str, secret: str, n: int) -> list[str]:
    """Real answers, made and logged by the gateway (1 token each, 8 at a time)."""

    async def run() -> list[str]:
        body = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        headers = {"Authorization": f"Bearer {secret}"}
        ids: list[str] = []
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as client:

            async def worker() -> None:
                while len(ids) < n:
                    response = await client.post("/v1/chat/completions", json=body)
                    response.raise_for_status()
                    ids.append(response.json()["id"])

            await asyncio.gather(*(worker() for _ in range(8)))
        return ids[:n]

    return asyncio.run(run())


def drain_spool(url: str, timeout: float = 300.0) -> int:
    """Wait until the gateway's spool is empty: a vote acknowledged while a database
    write timed out under load is in the spool, replayed into Postgres soon after.
    Returns how many spool entries there were at first."""
    first = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = int(httpx.get(url + "/readyz", timeout=10).json()["spool"]["entries"])
        first = entries if first is None else first
        if entries == 0:
            break
        time.sleep(1)
    return first or 0


def yardstick() -> float:
    """Seconds for a fixed pure-Python workload of the gateway's kind (UUIDs, hashed
    tuples, dicts, JSON). This machine's speed for such work drifts by 2x from one
    hour to the next while a plain arithmetic loop stays put; runs are comparable
    only at a similar yardstick."""
    started = time.perf_counter()
    ids = [uuid.UUID(int=i * 7919) for i in range(100_000)]
    table = {(u, str(i)): i for i, u in enumerate(ids)}
    rows = [{"c": str(u), "n": table[(u, str(i))]} for i, u in enumerate(ids)]
    json.loads(json.dumps(rows))
    return round(time.perf_counter() - started, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine-url", default=os.environ.get("RATCHET_ENGINE_URL"))
    parser.add_argument("--answers", type=int, default=200)
    parser.add_argument("--users", type=int, default=1000, help="end users voting")
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--clients", type=int, default=32, help="single-vote connections")
    parser.add_argument("--batch-clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=100, help="votes per batch")
    args = parser.parse_args()

    settings = Settings()
    model_dir = Path(settings.base_model_ref)
    if not settings.base_model:
        prepare_default(model_dir)
    yardstick_before = yardstick()
    server = os.environ.get("DATABASE_URL", DEFAULT_SERVER)
    with fresh_database(server, "ratchet_bench_votes") as db, tempfile.TemporaryDirectory() as tmp:
        unlimited = Limits(rpm=100_000_000, tpm=2_000_000_000, concurrency=10_000)
        _, secret = make_key(db, "chat", "bench", unlimited)
        env = {
            "DATABASE_URL": db,
            "RATCHET_DATA_DIR": tmp,
            "RATCHET_BASE_MODEL": str(model_dir),
            "RATCHET_VOTES_PER_ANSWER": "any",
        }
        if args.engine_url:
            env["RATCHET_ENGINE_URL"] = args.engine_url
        else:
            env["RATCHET_ENGINE_PORT"] = str(free_port())
        gw = start_gateway(env, Path(tmp) / "serve.log")
        try:
            answers = make_answers(gw.url, secret, args.answers)
            print(f"{len(answers)} answers made", flush=True)
            todo = pairs(answers, args.users)
            warm = asyncio.run(single_phase(gw.url, secret, todo, args.clients, 1.0))
            cpu, own, pg = cpu_seconds(gw.process.pid), time.process_time(), postgres_cpu(db)
            single = asyncio.run(single_phase(gw.url, secret, todo, args.clients, args.seconds))
            single_cpu = cpu_seconds(gw.process.pid) - cpu
            single_own, single_pg = time.process_time() - own, spent(pg, postgres_cpu(db))
            print(f"single: {single}", flush=True)
            cpu, own, pg = cpu_seconds(gw.process.pid), time.process_time(), postgres_cpu(db)
            batch = asyncio.run(
                batch_phase(gw.url, secret, todo, args.batch_clients, args.seconds, args.batch)
            )
            batch_cpu = cpu_seconds(gw.process.pid) - cpu
            batch_own, batch_pg = time.process_time() - own, spent(pg, postgres_cpu(db))
            print(f"batch: {batch}", flush=True)
            spooled = drain_spool(gw.url)
        finally:
            gw.stop()
            if "writing to the spool" in gw.log_path.read_text(errors="replace"):
                print("the gateway wrote to its spool (a database write timed out)", flush=True)
        stored = int(query(db, "SELECT count(*) AS n FROM votes")[0]["n"])
    # The warm-up's votes are stored too: they count as acknowledged.
    acknowledged = sum(int(p["acknowledged"]) for p in (warm, single, batch))  # type: ignore[call-overload]
    figures = {
        "single_votes_per_s": round(float(single["votes_per_s"]), 1),  # type: ignore[arg-type]
        "single_p50_ms": round(float(single["p50_ms"]), 2),  # type: ignore[arg-type]
        "single_p99_ms": round(float(single["p99_ms"]), 2),  # type: ignore[arg-type]
        "batch_votes_per_s": round(float(batch["votes_per_s"]), 1),  # type: ignore[arg-type]
        "batch_p99_ms": round(float(batch["batch_p99_ms"]), 2),  # type: ignore[arg-type]
        "single_gateway_cpu_ms_per_vote": round(
            1000 * single_cpu / max(1, int(single["acknowledged"])),  # type: ignore[call-overload]
            3,
        ),
        "batch_gateway_cpu_ms_per_vote": round(
            1000 * batch_cpu / max(1, int(batch["acknowledged"])),  # type: ignore[call-overload]
            3,
        ),
        "single_postgres_cpu_ms_per_vote": per_vote(single_pg, single),
        "single_bench_cpu_ms_per_vote": per_vote(single_own, single),
        "batch_postgres_cpu_ms_per_vote": per_vote(batch_pg, batch),
        "batch_bench_cpu_ms_per_vote": per_vote(batch_own, batch),
        "spooled_at_end": spooled,
        "acknowledged": acknowledged,
        "stored": stored,
        "cores": os.cpu_count(),
        "yardstick_s": (yardstick_before, yardstick()),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
