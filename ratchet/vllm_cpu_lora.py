"""Grouped LoRA matmuls for vLLM's CPU backend: a vLLM general plugin.

vLLM's CPU punica ops (vllm/lora/ops/torch_ops) gather each token's own copy of its
adapter's (rank x hidden) matrices and multiply token by token. For a prefill of a
few thousand tokens that copies gigabytes per layer: greedy answers through a LoRA
ran 4x slower than the base here, and a batch that mixed base and LoRA requests ran
slower than the two apart. A batch holds at most `max_loras` adapters, so the same
product is a few matrix multiplications, one per adapter over its tokens. The
results are the same sums in another order (fp32 rounding aside).

Loaded by vLLM in each of its processes through the `vllm.general_plugins` entry
point; it acts only on the CPU platform. `RATCHET_VLLM_GROUPED_LORA=0` leaves vLLM's
own ops in place (bench/lora_cpu.py measures both).
"""

import os

import torch

ENV = "RATCHET_VLLM_GROUPED_LORA"


def grouped_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Row t is inputs[t] @ weights[indices[t]].T; zero where indices[t] < 0 (no LoRA).

    `weights` is (slots, out, in) or (slots, 1, out, in), as vLLM stacks them.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    slots = torch.unique(indices).tolist()
    if len(slots) == 1 and slots[0] >= 0:  # one adapter for the whole batch: one GEMM
        return x @ weights[slots[0]].to(dtype).T
    out = x.new_zeros((x.shape[0], weights.shape[1]))
    for slot in slots:
        if slot < 0:  # vLLM's mark for a token of a request without an adapter
            continue
        rows = (indices == slot).nonzero().squeeze(1)
        out[rows] = x[rows] @ weights[slot].to(dtype).T
    return out


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = grouped_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    # As vLLM's: one row broadcast over the output, and the narrower of the two paddings.
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def _per_token(lora_indices: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices, seq_lens)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs
    )


OPS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}


def register() -> None:
    """The plugin's entry point: swap the ops vLLM's CPU punica wrapper calls."""
    if os.environ.get(ENV, "1") == "0":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    # The wrapper imported the ops by name; its module's names are what it calls.
    from vllm.lora.punica_wrapper import punica_cpu

    for name, op in OPS.items():
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, op)
