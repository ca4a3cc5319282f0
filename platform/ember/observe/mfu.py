"""Model FLOPs utilisation: the FLOPs a GPT's tokens need (PaLM's count: 6 x active matmul parameters + the
attention's 12 x layers x d_model x seq_len, per token, forward and backward) times tokens/s, over the peak
of the ranks' devices. MoE counts only the experts a token reaches (top_k routed + shared) and the router.

Peak per device: `cluster.peak_tflops` when given; else a table of known GPUs (dense bf16, the usual MFU
reference); else (a CPU, an unknown GPU) a short matmul probe in the run's precision.
"""

from __future__ import annotations

import time

import torch

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}


def gpt_flops_per_token(model) -> float:
    """Training FLOPs per token of a GPT model section (forward + backward)."""
    d, width = model.d_model, model.ffn_width
    ffn = (3 if model.mlp == "swiglu" else 2) * d * width  # multiply-adds of one FFN (or one expert)
    params = model.vocab_size * d  # the output projection
    for block in range(model.n_layers):
        params += 2 * d * d + 2 * d * model.kv_heads * (d // model.n_heads)  # q, o; k, v (fewer under GQA)
        if block not in model.moe_layers:
            params += ffn
            continue
        moe = model.moe_layer_spec(block)
        params += moe.num_experts * d + (moe.top_k + moe.shared_experts) * ffn + (d if moe.shared_expert_gate else 0)
        params += (ffn + 2 * d) if moe.residual else 0
    return 6.0 * params + 12.0 * model.n_layers * d * model.seq_len


def device_peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float:
    """Peak FLOP/s of one rank's device."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for model, tflops in PEAK_TFLOPS.items():
            if model in name:
                return tflops * 1e12
    dtype = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32
    return matmul_probe(device, dtype)


def matmul_probe(device: torch.device, dtype: torch.dtype, size: int = 512, seconds: float = 0.2) -> float:
    """Measured FLOP/s of square matmuls on this device (best of a few timed runs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def model_flops_utilisation(flops_per_token: float, tokens_per_s: float, peak_per_rank: float, ranks: int) -> float:
    return flops_per_token * tokens_per_s / max(peak_per_rank * ranks, 1.0)
