"""The grouped LoRA ops compute what vLLM's CPU ops compute, and vLLM loads them.

bench/lora_cpu.py measures the speed and compares greedy answers of two real engines;
here the ops are held to vLLM's own on random batches of the shapes the engine uses.
"""

import os
import subprocess
import sys

import pytest
import torch
from vllm.lora.ops import torch_ops as stock

from ratchet import vllm_cpu_lora as grouped
from ratchet.vllm_cpu_lora import ENV

TOKENS, HIDDEN, RANK, OUT, SLOTS = 96, 576, 16, 1536, 2


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {
        "x": torch.randn(TOKENS, HIDDEN, generator=gen),
        "a": torch.randn(SLOTS, 1, RANK, HIDDEN, generator=gen),
        "b": torch.randn(SLOTS, 1, OUT, RANK, generator=gen),
        "mid": torch.randn(TOKENS, RANK, generator=gen),
        "out": torch.randn(TOKENS, 2 * OUT, generator=gen),
        "indices": torch.randint(0, SLOTS, (TOKENS,), generator=gen),
    }


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-3))


def test_each_op_matches_vllm_s(batch: dict[str, torch.Tensor]) -> None:
    x, a, b, mid, idx = batch["x"], batch["a"], batch["b"], batch["mid"], batch["indices"]
    want, got = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    stock.bgmv_shrink(x, a, want, idx, 0.5)
    grouped.bgmv_shrink(x, a, got, idx, 0.5)
    assert close(want, got) and want.abs().sum() > 0
    for add in (True, False):
        want, got = batch["out"].clone(), batch["out"].clone()
        stock.bgmv_expand(mid, b, want, idx, add)
        grouped.bgmv_expand(mid, b, got, idx, add)
        assert close(want, got)
        want, got = batch["out"].clone(), batch["out"].clone()
        stock.bgmv_expand_slice(mid, b, want, idx, OUT, OUT, add)
        grouped.bgmv_expand_slice(mid, b, got, idx, OUT, OUT, add)
        assert close(want, got) and torch.equal(want[:, :OUT], batch["out"][:, :OUT])


def test_prefill_ops_spread_each_sequence_s_adapter_over_its_tokens(
    batch: dict[str, torch.Tensor],
) -> None:
    x, a, b, mid = batch["x"], batch["a"], batch["b"], batch["mid"]
    lens, slots = torch.tensor([30, 50, 16]), torch.tensor([1, 0, 1])
    starts = torch.tensor([0, 30, 80])
    meta = (starts, lens, slots, 3, 50, TOKENS)
    want, got = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    stock.sgmv_shrink(x, a, want, *meta, 2.0)
    grouped.sgmv_shrink(x, a, got, *meta, 2.0)
    assert close(want, got)
    want, got = batch["out"].clone(), batch["out"].clone()
    stock.sgmv_expand(mid, b, want, *meta, True)
    grouped.sgmv_expand(mid, b, got, *meta, True)
    assert close(want, got)
    want, got = batch["out"].clone(), batch["out"].clone()
    stock.sgmv_expand_slice(mid, b, want, *meta, OUT, OUT, False)
    grouped.sgmv_expand_slice(mid, b, got, *meta, OUT, OUT, False)
    assert close(want, got)


def test_a_token_without_an_adapter_gets_no_lora(batch: dict[str, torch.Tensor]) -> None:
    # -1 is vLLM's "no LoRA" (punica_wrapper/utils.py); its torch ops would index the
    # last slot with it instead.
    idx = batch["indices"].clone()
    idx[::3] = -1
    shrunk = torch.full((TOKENS, RANK), 7.0)
    grouped.bgmv_shrink(batch["x"], batch["a"], shrunk, idx, 1.0)
    assert torch.equal(shrunk[::3], torch.zeros_like(shrunk[::3]))
    expanded = batch["out"].clone()
    grouped.bgmv_expand(batch["mid"], batch["b"], expanded, idx, True)
    assert torch.equal(expanded[::3], batch["out"][::3])
    assert not torch.equal(expanded[1::3], batch["out"][1::3])


@pytest.mark.parametrize("setting", ["1", "0"])
def test_vllm_loads_the_plugin_unless_it_is_turned_off(setting: str) -> None:
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins();"
        "from vllm.lora.punica_wrapper import punica_cpu as p;"
        "print(p.bgmv_shrink.__module__, p.sgmv_expand_slice.__module__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, ENV: setting},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    modules = set(done.stdout.split())
    ours, vllm_s = "ratchet.vllm_cpu_lora", "vllm.lora.ops.torch_ops.lora_ops"
    assert modules == ({ours} if setting == "1" else {vllm_s})
