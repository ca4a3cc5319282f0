"""The Mixtral / Qwen-MoE / DeepSeek-V3 options of ember's MoE layer against a plain per-token reference written
here: SwiGLU experts with and without biases, top-k up to 8, sigmoid scoring, shared experts (gated or not),
and auxiliary-loss-free bias balancing (bias chooses, never weighs; moved by the load after each step)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.models import build_model
from ember.models.layers.moe import EmberMoE
from ember.models.layers.moe.experts import GATED_RUNNERS, choose_backend
from ember.models.layers.moe.router import update_balance_biases
from ember.spec.model import GPTSpec, MoESpec

D_MODEL, D_FF, TOKENS = 16, 24, 40


pytestmark = pytest.mark.usefixtures("one_thread")


def build_layer(mlp: str = "swiglu", bias: bool = False, **moe) -> EmberMoE:
    spec = MoESpec(**({"num_experts": 8, "drop_tokens": False, "aux_loss_weight": 0.01} | moe))
    torch.manual_seed(0)
    layer = EmberMoE(D_MODEL, D_FF, spec, mlp=mlp, bias=bias)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(std=0.3)
    return layer


def reference_expert(layer: EmberMoE, e: int, token: torch.Tensor) -> torch.Tensor:
    experts = layer.experts
    b_in, b_out = experts.b_in.view(experts.num_local, -1)[e], experts.b_out.view(experts.num_local, -1)[e]
    hidden = token @ experts.w_in[e] + b_in
    if experts.gated:
        gate, up = hidden[:D_FF], hidden[D_FF:]
        return (F.silu(gate) * up) @ experts.w_out[e] + b_out
    return F.gelu(hidden, approximate="tanh") @ experts.w_out[e] + b_out


def reference_shared(layer: EmberMoE, token: torch.Tensor) -> torch.Tensor:
    if not hasattr(layer, "shared"):
        return torch.zeros_like(token)
    mlp = layer.shared
    gelu = mlp.kind == "gelu"
    hidden = F.gelu(mlp.fc(token), approximate="tanh") if gelu else F.silu(mlp.gate(token)) * mlp.fc(token)
    out = mlp.proj(hidden)
    return out if layer.shared_gate is None else torch.sigmoid(layer.shared_gate(token)) * out


def reference_moe(layer: EmberMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: scores, top-k on scores + bias, weights from the scores alone, renormalised when asked."""
    router = layer.router
    outputs = []
    for token in x:
        logits = token @ router.gate.weight.t()
        scores = F.softmax(logits, dim=-1) if router.scoring == "softmax" else torch.sigmoid(logits)
        bias = router.score_bias if router.score_bias is not None else torch.zeros_like(scores)
        chosen = torch.topk(scores + bias, router.top_k).indices
        weights = scores[chosen]
        weights = weights / weights.sum() if router.normalise else weights
        out = reference_shared(layer, token)
        for weight, e in zip(weights, chosen.tolist(), strict=True):
            out = out + weight * reference_expert(layer, e, token)
        outputs.append(out)
    return torch.stack(outputs)


def assert_outputs_and_gradients_match(layer: EmberMoE) -> None:
    x = torch.randn(TOKENS, D_MODEL, requires_grad=True)
    out, _ = layer(x)
    ours = [out, *torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])]
    expected = reference_moe(layer, x)
    theirs = [expected, *torch.autograd.grad(expected.square().sum(), [x, *layer.parameters()])]
    for (name, _), mine, ref in zip([("output", 0), ("x", 0), *layer.named_parameters()], ours, theirs, strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "options",
    [
        {"top_k": 2},  # Mixtral
        {"top_k": 4, "shared_experts": 2, "shared_expert_gate": True},  # Qwen-MoE
        {"top_k": 8, "shared_experts": 1},  # DeepSeek-MoE: every expert, an ungated shared one
        {"top_k": 4, "scoring": "sigmoid", "balance": "bias"},  # DeepSeek-V3
        {"top_k": 1, "norm_topk_prob": True},  # weight 1 on the chosen expert
        {"top_k": 3, "norm_topk_prob": False},
    ],
)
@pytest.mark.parametrize("backend", sorted(GATED_RUNNERS))
def test_swiglu_routing_options_match_a_per_token_reference(options, backend):
    layer = build_layer(**options)
    layer.experts.backend = backend
    if layer.router.score_bias is not None:
        layer.router.score_bias.copy_(torch.linspace(-0.5, 0.5, 8))  # big enough to change choices
    assert_outputs_and_gradients_match(layer)


@pytest.mark.parametrize("bias", [True, False])
def test_gelu_and_biases_options_match_the_reference(bias):
    assert_outputs_and_gradients_match(build_layer(mlp="gelu", bias=bias, top_k=2, shared_experts=1))


def test_experts_without_bias_hold_zero_buffers_in_the_stacked_layout():
    layer = build_layer(bias=False, top_k=2)
    state = layer.state_dict()
    assert {"experts.w_in", "experts.b_in", "experts.w_out", "experts.b_out"} <= set(state)
    assert not any(name.startswith("experts.b_") for name, _ in layer.named_parameters())
    assert state["experts.w_in"].shape == (8, D_MODEL, 2 * D_FF)  # gate and up side by side


def test_bias_chooses_experts_but_never_weighs_them():
    layer = build_layer(top_k=2, scoring="sigmoid", balance="bias")
    x = torch.randn(TOKENS, D_MODEL)
    layer.router.score_bias.copy_(torch.tensor([10.0, 10.0, 0, 0, 0, 0, 0, 0]))  # experts 0 and 1 win
    routing = layer.router(x)
    assert torch.equal(routing.experts.sort(dim=1).values, torch.tensor([[0, 1]]).expand(TOKENS, 2))
    scores = torch.sigmoid(x @ layer.router.gate.weight.t()).gather(1, routing.experts)
    torch.testing.assert_close(routing.weights, scores / scores.sum(1, keepdim=True))
    assert routing.balance_loss.item() == 0.0  # no auxiliary loss under bias balancing


def test_balance_bias_moves_towards_the_underloaded_experts_after_each_step_and_is_checkpointed():
    layer = build_layer(top_k=1, balance="bias", bias_update_rate=0.01)
    x = torch.randn(TOKENS, D_MODEL)
    with torch.no_grad():
        layer.eval()
        layer(x)  # evaluation and generation leave the load alone
    assert layer.router.pending_load.sum() == 0
    layer.train()
    layer(x)
    load = torch.bincount(layer.router(x).experts.flatten(), minlength=8).float()
    update_balance_biases(layer)
    expected = 0.01 * torch.sign(load.mean() - load)  # two training forwards saw the same load, twice
    torch.testing.assert_close(layer.router.score_bias, expected)
    assert layer.router.pending_load.sum() == 0
    assert "router.score_bias" in layer.state_dict()
    assert "router.pending_load" not in layer.state_dict()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_bias_balancing_spreads_a_skewed_load(scoring):
    layer = build_layer(top_k=1, scoring=scoring, balance="bias", bias_update_rate=0.01)
    with torch.no_grad():
        layer.router.gate.weight[0] += 0.2  # tokens share a direction expert 0 prefers: ~84% pick it
    x = torch.randn(256, D_MODEL) + 1.0
    loads = []
    for _ in range(60):
        layer(x)
        loads.append(layer.router.last_stats["expert_fraction"].max().item())
        update_balance_biases(layer)
    assert loads[0] > 0.6  # 1/8 is perfect balance
    assert max(loads[-5:]) < 0.25


def test_default_gpt_keeps_its_parameters_and_a_llama_style_gpt_has_none_of_gpt2s():
    old = build_model(GPTSpec(d_model=32, n_heads=4, n_layers=2, seq_len=16))
    assert "pos_emb.weight" in old.state_dict()
    assert "blocks.0.attn.qkv.bias" in old.state_dict()
    llama = build_model(
        GPTSpec(d_model=32, n_heads=4, n_layers=2, seq_len=16, norm="rmsnorm", position="rope", mlp="swiglu",
                bias=False, moe={"num_experts": 4, "top_k": 2, "every_n_layers": 2, "shared_experts": 1})
    )
    names = set(llama.state_dict())
    assert not any(name.endswith(".bias") or "pos_emb" in name for name in names)
    assert "blocks.0.ffn.gate.weight" in names
    assert "blocks.1.ffn.moe.shared.gate.weight" in names


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_grouped_gemm_in_bf16_is_as_accurate_as_the_segment_loop(mlp):
    """The CUDA default's arithmetic (torch's grouped GEMM in bf16), run on CPU: its outputs and gradients are
    as close to the fp32 result as the CPU default's in bf16 (the two round in different orders)."""
    layer = build_layer(mlp=mlp, bias=True, top_k=2)
    x = torch.randn(TOKENS, D_MODEL)

    def run(dtype: torch.dtype, backend: str) -> list[torch.Tensor]:
        layer.to(dtype).experts.backend = backend
        inputs = x.to(dtype).requires_grad_()
        out, _ = layer(inputs)
        grads = torch.autograd.grad(out, [inputs, layer.experts.w_in, layer.experts.w_out], torch.ones_like(out))
        return [t.float() for t in (out, *grads)]

    exact = run(torch.float32, "segments")
    loop, grouped = run(torch.bfloat16, "segments"), run(torch.bfloat16, "grouped_mm")
    for want, by_loop, by_grouped in zip(exact, loop, grouped, strict=True):
        scale = want.abs().max()
        assert (by_grouped - want).abs().max() <= 2 * (by_loop - want).abs().max() + 1e-3 * scale


def test_the_default_backend_is_grouped_gemm_only_on_a_bf16_gpu_that_has_it():
    assert choose_backend("cpu", torch.bfloat16, (256, 1024)) == "segments"
    assert choose_backend("cuda", torch.bfloat16, (256, 1024), capability=(9, 0)) == "grouped_mm"
    assert choose_backend("cuda", torch.bfloat16, (256, 1024), capability=(8, 0)) == "grouped_mm"
    assert choose_backend("cuda", torch.bfloat16, (256, 1024), capability=(7, 5)) == "segments"  # no kernel
    assert choose_backend("cuda", torch.float32, (256, 1024), capability=(9, 0)) == "segments"
    assert choose_backend("cuda", torch.bfloat16, (256, 1020), capability=(9, 0)) == "segments"  # rows unaligned
