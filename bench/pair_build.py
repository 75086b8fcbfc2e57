"""Pair building at scale: 1,000,000 votes over 200,000 answers, then `ratchet data build`.

    .venv/bin/python bench/pair_build.py [--answers 200000] [--votes-per-answer 5]

Creates a scratch database on the configured server (DATABASE_URL, default the local
test server), loads answers, votes and comparisons with COPY, then times the real
`ratchet data build --timings` command (process start, SQL rules, parquet files, all
of it). The last line of output is one JSON object of the figures; `stages` holds the
seconds of each stage the command reported, and `outside_stages_s` what is left of
the total (process start, imports, the migration check).
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from feedback.prompts import prompt_sha256  # noqa: E402
from tests.helpers import fresh_database  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
WORDS = "the a model answer explains light colour sky because of scattering and more".split()
STAGE = re.compile(r"^stage (\w+): ([0-9.]+) s$")


def load(url: str, n_answers: int, votes_per_answer: int, per_prompt: int, seed: int) -> int:
    """COPY answers, votes and comparisons in; return the number of votes."""
    rng = random.Random(seed)
    n_prompts = n_answers // per_prompt
    prompts = []
    for p in range(n_prompts):
        messages = [{"role": "user", "content": f"Question number {p}: why is the sky blue?"}]
        prompts.append((json.dumps(messages), prompt_sha256(messages)))
    answer_ids: list[tuple[uuid.UUID, int, float]] = []
    votes = 0
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY completions (id, public_model, engine_model, messages, params, prompt_sha256,"
            " stream, status, output, finish_reason, prompt_tokens, completion_tokens,"
            " latency_ms) FROM STDIN"
        ) as copy:
            for i in range(n_answers):
                p = i // per_prompt
                uid, quality = uuid.uuid4(), rng.random()
                answer_ids.append((uid, p, quality))
                text = f"Answer {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(12, 40)))
                copy.write_row(
                    (
                        uid,
                        "production",
                        "base",
                        prompts[p][0],
                        "{}",
                        prompts[p][1],
                        False,
                        "complete",
                        text,
                        "stop",
                        30,
                        rng.randint(5, 60),
                        100.0,
                    )
                )
        with cur.copy(
            "COPY votes (completion_id, end_user, rating, correction) FROM STDIN"
        ) as copy:
            for uid, _, quality in answer_ids:
                for user in range(votes_per_answer):
                    rating = 1 if rng.random() < quality else -1
                    correction = None
                    if rating < 0 and rng.random() < 0.01:
                        correction = "A corrected answer that explains Rayleigh scattering well."
                    copy.write_row((uid, f"user{user}", rating, correction))
                    votes += 1
        with cur.copy(
            "COPY comparisons (id, messages, params, completion_a, completion_b, choice,"
            " decided_at) FROM STDIN"
        ) as copy:
            for start in range(0, n_answers - 1, per_prompt):
                a, b = answer_ids[start][0], answer_ids[start + 1][0]
                copy.write_row(
                    (
                        uuid.uuid4(),
                        prompts[answer_ids[start][1]][0],
                        "{}",
                        a,
                        b,
                        rng.choice(["a", "b", "tie", "both_bad"]),
                        "now",
                    )
                )
        cur.execute("ANALYZE")
    return votes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", type=int, default=200_000)
    parser.add_argument("--votes-per-answer", type=int, default=5)
    parser.add_argument("--answers-per-prompt", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    server = os.environ.get("DATABASE_URL", DEFAULT_SERVER)
    with fresh_database(server, "ratchet_bench_pairs") as url:
        started = time.perf_counter()
        votes = load(url, args.answers, args.votes_per_answer, args.answers_per_prompt, args.seed)
        print(
            f"loaded {votes} votes over {args.answers} answers in "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as data_dir:
            env = {**os.environ, "DATABASE_URL": url, "RATCHET_DATA_DIR": data_dir}
            started = time.perf_counter()
            done = subprocess.run(
                [str(Path(sys.executable).parent / "ratchet"), "data", "build", "--timings"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            seconds = time.perf_counter() - started
        print(done.stdout.strip(), flush=True)
        stages = {
            m[1]: float(m[2]) for line in done.stderr.splitlines() if (m := STAGE.match(line))
        }
        total = stages.pop("total", sum(stages.values()))
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM pairs").fetchone()
            sources = conn.execute("SELECT count(*) FROM pair_sources").fetchone()
        assert row is not None and sources is not None
        print(
            json.dumps(
                {
                    "votes": votes,
                    "answers": args.answers,
                    "build_s": round(seconds, 2),
                    "votes_per_s": round(votes / seconds),
                    "pairs": row[0],
                    "pair_sources": sources[0],
                    "stages": {k: round(v, 2) for k, v in stages.items()},
                    "outside_stages_s": round(seconds - total, 2),
                }
            )
        )


if __name__ == "__main__":
    main()
