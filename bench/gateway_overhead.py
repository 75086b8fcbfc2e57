"""Gateway overhead: the same workload straight to vLLM and through the gateway.

    .venv/bin/python bench/gateway_overhead.py [--rounds 4] [--requests 16]
    .venv/bin/python bench/gateway_overhead.py --engine-url http://127.0.0.1:8000 --only-idle

Starts `ratchet serve` (which supervises a vLLM CPU engine, or with `--engine-url`
uses a running one for both sides) on free ports, on the configured database
(DATABASE_URL, or the embedded one), with answer logging on as in production. Rounds
alternate direct / gateway in ABBA order so that drift on a noisy machine falls on
both sides alike. Each round sends `--requests` chat completions, 16 at a time, with
128 forced tokens (`ignore_eos`), so both sides generate exactly the same number of
tokens.

Figures: throughput ratio (gateway tok/s over direct tok/s, non-streamed and
streamed), p50 latency added under that load, and p50 added to a lone 1-token
request (the gateway's own cost, without queueing noise), also as the median of
paired differences with a bootstrap 95% interval. The last line of output
is one JSON object of the figures (`--only-idle`: the lone-request ones alone).
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ratchet.db import database_url  # noqa: E402
from ratchet.keys import Limits  # noqa: E402
from ratchet.model import prepare_default  # noqa: E402
from ratchet.settings import Settings  # noqa: E402
from tests.helpers import free_port, make_key, start_gateway  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


async def one(
    client: httpx.AsyncClient, url: str, key: str, body: dict[str, object]
) -> tuple[float, int]:
    """One request; return (latency s, completion tokens)."""
    started = time.perf_counter()
    if not body.get("stream"):
        response = await client.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
        response.raise_for_status()
        return time.perf_counter() - started, int(response.json()["usage"]["completion_tokens"])
    tokens = 0
    async with client.stream(
        "POST", url, json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = int(usage["completion_tokens"])
    return time.perf_counter() - started, tokens


async def round_(
    base: str, key: str, model: str, n: int, concurrency: int, max_tokens: int, stream: bool
) -> tuple[float, list[float]]:
    """Run n requests, `concurrency` at a time; return (tokens/s, latencies)."""
    body: dict[str, object] = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.8,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    results: list[tuple[float, int]] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                results.append(await one(client, base + "/v1/chat/completions", key, body))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return sum(t for _, t in results) / wall, [lat for lat, _ in results]


async def probe(
    direct: tuple[str, str], gateway: tuple[str, str], n: int
) -> dict[str, float | list[float]]:
    """Lone 1-token requests, alternating direct / gateway; the lone-request figures."""
    lat: dict[str, list[float]] = {"d": [], "g": []}
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(2 * n):
            side, (url, model) = ("d", direct) if i % 2 == 0 else ("g", gateway)
            body = {"model": model, "messages": PROMPT, "max_tokens": 1}
            latency, _ = await one(client, url + "/v1/chat/completions", KEY, body)
            if i >= 4:  # warm-up
                lat[side].append(latency * 1000)
    return lone_figures(lat["d"], lat["g"])


def lone_figures(direct: list[float], gateway: list[float]) -> dict[str, float | list[float]]:
    """The difference of the two sides' medians (the published figure), and the median
    of the paired differences (each gateway request minus the direct one sent just
    before it) with a bootstrap 95% interval. The pairing cancels the machine's drift
    between requests; the interval says how far a run's figure can be trusted."""
    diffs = [g - d for d, g in zip(direct, gateway, strict=False)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(BOOTSTRAP))
    return {
        "idle_direct_p50_ms": round(statistics.median(direct), 2),
        "idle_added_p50_ms": round(statistics.median(gateway) - statistics.median(direct), 2),
        "idle_added_paired_p50_ms": round(statistics.median(diffs), 2),
        "idle_added_paired_ci95_ms": [
            round(medians[int(BOOTSTRAP * 0.025)], 2),
            round(medians[int(BOOTSTRAP * 0.975)], 2),
        ],
    }


BOOTSTRAP = 2000
KEY = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="plain rounds per side (even)")
    parser.add_argument("--requests", type=int, default=16, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--stream-rounds", type=int, default=2, help="streamed rounds per side")
    parser.add_argument("--probes", type=int, default=120, help="lone requests per side")
    parser.add_argument("--engine-url", help="a running vLLM server to use instead of starting one")
    parser.add_argument(
        "--only-idle", action="store_true", help="only the lone requests (a quick check)"
    )
    args = parser.parse_args()

    settings = Settings()
    model_dir = Path(settings.base_model_ref)
    if not settings.base_model:
        prepare_default(model_dir)
    global KEY
    with database_url(settings) as conninfo, tempfile.TemporaryDirectory() as tmp:
        from ratchet.migrate import migrate

        migrate(conninfo)
        # The gateway's cost is measured, not its quotas: the key has none that bind.
        unlimited = Limits(rpm=10_000_000, tpm=2_000_000_000, concurrency=10_000)
        _, KEY = make_key(conninfo, "chat", "bench", unlimited)
        engine_port = free_port()
        env = {
            "RATCHET_DATA_DIR": str(settings.data_dir),
            "RATCHET_ENGINE_PORT": str(engine_port),
            "RATCHET_ENGINE_URL": args.engine_url or "",
            "RATCHET_BASE_MODEL": str(model_dir),
            # Both sides generate exactly max_tokens: ignore_eos, which ops must allow.
            "RATCHET_EXTRA_REQUEST_FIELDS": '["ignore_eos"]',
        }
        if not os.environ.get("DATABASE_URL"):
            env["DATABASE_URL"] = conninfo
        gw = start_gateway(env, Path(tmp) / "serve.log")
        try:
            engine = args.engine_url or f"http://127.0.0.1:{engine_port}"
            engine_model = httpx.get(engine + "/v1/models").json()["data"][0]["id"]
            figures = asyncio.run(measure(args, (engine, engine_model), (gw.url, "base")))
        finally:
            gw.stop()
    print(json.dumps(figures))


async def measure(
    args: argparse.Namespace, direct: tuple[str, str], gateway: tuple[str, str]
) -> dict[str, float | list[float]]:
    sides = {"d": direct, "g": gateway}
    for url, model in (direct, gateway):  # warm-up
        await round_(url, KEY, model, 16, args.concurrency, 16, False)
    figures: dict[str, float | list[float]] = {}
    plans = () if args.only_idle else ((False, args.rounds), (True, args.stream_rounds))
    for stream, rounds in plans:
        tps: dict[str, list[float]] = {"d": [], "g": []}
        lats: dict[str, list[float]] = {"d": [], "g": []}
        order = "dggd" * (rounds // 2)
        for i, side in enumerate(order):
            url, model = sides[side]
            rate, latencies = await round_(
                url, KEY, model, args.requests, args.concurrency, args.max_tokens, stream
            )
            tps[side].append(rate)
            lats[side].extend(latencies)
            print(
                f"round {i + 1:2d} {'stream' if stream else 'plain '} "
                f"{'gateway' if side == 'g' else 'direct '}: {rate:6.1f} tok/s, "
                f"p50 {statistics.median(latencies) * 1000:7.1f} ms",
                flush=True,
            )
        prefix = "stream_" if stream else ""
        figures[prefix + "direct_tok_s"] = round(statistics.mean(tps["d"]), 1)
        figures[prefix + "gateway_tok_s"] = round(statistics.mean(tps["g"]), 1)
        figures[prefix + "throughput_ratio"] = round(sum(tps["g"]) / sum(tps["d"]), 3)
        figures[prefix + "added_p50_ms"] = round(
            (statistics.median(lats["g"]) - statistics.median(lats["d"])) * 1000, 1
        )
    figures.update(await probe(direct, gateway, args.probes))
    return figures


if __name__ == "__main__":
    main()
