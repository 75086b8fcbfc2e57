"""Test helpers: free ports, keys, a supervised `ratchet serve`, LoRA adapters."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from ratchet import keys
from ratchet.settings import Settings
from serve.supervisor import engine_command, engine_env

ROOT = Path(__file__).resolve().parent.parent
RATCHET = str(Path(sys.executable).parent / "ratchet")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_key(
    conninfo: str,
    role: keys.Role,
    name: str = "test",
    limits: keys.Limits | None = None,
    scopes: tuple[keys.Scope, ...] = (),
) -> tuple[str, str]:
    """Create a key; return (key id, secret)."""

    async def create() -> tuple[str, str]:
        async with await psycopg.AsyncConnection.connect(conninfo) as conn:
            key, secret = await keys.create_key(conn, role, name, limits, scopes)
        return str(key.id), secret

    return asyncio.run(create())


def query(conninfo: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(conninfo, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def wait_until_ended(conninfo: str, uid: str, timeout: float = 30) -> dict[str, Any]:
    """The row of a streamed answer once it has left 'streaming' (the gateway writes it
    when it notices the client left)."""
    deadline = time.monotonic() + timeout
    while (row := query(conninfo, "SELECT * FROM completions WHERE id = %s", uid)[0])[
        "status"
    ] == "streaming":
        assert time.monotonic() < deadline, "row never left 'streaming'"
        time.sleep(0.2)
    return row


def wait_for(condition: Callable[[], object], timeout: float, what: str = "it") -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def counts(conninfo: str) -> dict[str, int]:
    """Row counts of every table a request could write to."""
    tables = ("completions", "votes", "comparisons", "adapters", "promotions", "api_keys")
    return {t: int(query(conninfo, f"SELECT count(*) AS n FROM {t}")[0]["n"]) for t in tables}


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


class Engine:
    """A vLLM server of our own on a fixed port, so that it can come back there (or be
    frozen with SIGSTOP, like a hung GPU)."""

    def __init__(self, base_model: Path, log: Path, core: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = Settings(base_model=str(base_model), engine_port=self.port)
        # Two engines on one box get a core each, as vLLM's CPU docs advise. Left to
        # auto-binding, both pin their workers to the same core, and the one that is
        # starting gets no time from the one that is serving (8+ minutes to come up).
        # A single-process CPU engine is not bound by vLLM: its process is pinned here.
        self.core = core
        self.env = {
            **engine_env(self.settings),
            "VLLM_CPU_OMP_THREADS_BIND": str(core),
            "OMP_NUM_THREADS": "1",
        }
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                engine_command(self.settings),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: os.sched_setaffinity(0, {self.core}),
            )

    def wait_healthy(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process and self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"engine {self.url} not healthy in {timeout} s")

    def kill(self) -> None:
        assert self.process
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def adapters(self) -> set[str]:
        models = httpx.get(self.url + "/v1/models", timeout=10).json()["data"]
        return {m["id"] for m in models if m.get("parent")}

    def freeze(self) -> None:
        assert self.process
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process
        os.killpg(self.process.pid, signal.SIGCONT)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Gateway:
    """A `ratchet serve` subprocess."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    engine_url: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_gateway(
    env: dict[str, str],
    log_path: Path,
    *args: str,
    ready_timeout: float = 420.0,
    port: int | None = None,
) -> Gateway:
    """Start `ratchet serve --port P ARGS`, wait until /readyz answers 200."""
    port = port or free_port()
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [RATCHET, "serve", "--port", str(port), *args],
            env={**os.environ, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    gateway = Gateway(f"http://127.0.0.1:{port}", process, log_path)
    wait_ready(gateway, ready_timeout)
    return gateway


def wait_ready(gateway: Gateway, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"ratchet serve exited early:\n{gateway.log()}")
        try:
            if httpx.get(gateway.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    gateway.stop()
    raise RuntimeError(f"ratchet serve not ready in {timeout} s:\n{gateway.log()}")


def make_lora(
    base_dir: Path,
    out_dir: Path,
    seed: int,
    scale: float = 0.5,
    rank: int = 8,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """A PEFT LoRA on the base whose B matrices are random, so that outputs change."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(modules), task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def register_adapter(gateway: Gateway, ops_secret: str, path: Path) -> httpx.Response:
    """POST /v1/admin/adapters for `path`."""
    return httpx.post(
        gateway.url + "/v1/admin/adapters",
        headers=auth(ops_secret),
        json={"path": str(path)},
        timeout=60,
    )


@contextmanager
def fresh_database(server_url: str, prefix: str = "ratchet_test") -> Iterator[str]:
    """A new, migrated database on the server, dropped afterwards."""
    from ratchet.migrate import migrate

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
