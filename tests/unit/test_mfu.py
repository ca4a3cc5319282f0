"""MFU: FLOPs per token counted from the spec equal 6 x the matmul weights a token passes through (counted on the
built model) + PaLM's attention term; MFU = that x tokens/s over the ranks' peak."""

from __future__ import annotations

import torch
from torch import nn

from ember.models import build_model
from ember.observe.mfu import gpt_flops_per_token, matmul_probe, model_flops_utilisation
from ember.observe.progress import format_event
from ember.spec.model import GPTSpec


def active_matmul_weights(model) -> int:
    """Every Linear weight (the tied head counted once, as the output projection), and of each MoE layer's
    stacked experts the share of top_k of them."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".router.noise" not in name:
            total += module.weight.numel()
    for block in model.blocks:
        moe = getattr(block.ffn, "moe", None)
        if moe is not None:
            experts = moe.experts
            per_expert = (experts.w_in.numel() + experts.w_out.numel()) // experts.num_local
            total += moe.router.top_k * per_expert
    return total


def test_flops_per_token_match_the_built_models_weights():
    for fields in (
        {},
        {"mlp": "swiglu", "n_kv_heads": 2,
         "moe": {"num_experts": 4, "top_k": 2, "shared_experts": 1, "shared_expert_gate": True}},
    ):
        spec = GPTSpec(d_model=32, n_heads=4, n_layers=4, seq_len=16, vocab_size=50, **fields)
        expected = 6 * active_matmul_weights(build_model(spec)) + 12 * 4 * 32 * 16
        assert gpt_flops_per_token(spec) == expected


def test_mfu_is_achieved_over_peak_flops_and_shows_in_the_progress_line():
    assert model_flops_utilisation(1e9, 100.0, peak_per_rank=1e11, ranks=2) == 0.5
    assert matmul_probe(torch.device("cpu"), torch.float32, size=64, seconds=0.01) > 1e6
    event = {"kind": "log", "step": 1, "total": 2, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0,
             "mfu": 0.123}
    assert "mfu 12.3%" in format_event(event)
