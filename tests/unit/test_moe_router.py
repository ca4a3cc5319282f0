"""The router on its own: capacity rules, the balancing and z losses at work, noisy gating, the stats it exposes."""

from __future__ import annotations

import math

import pytest
import torch

from ember.models.layers.moe import EmberMoE
from ember.models.layers.moe.router import TopKRouter, deepspeed_capacity, keep_first_come
from ember.spec.model import MoESpec

D_MODEL, EXPERTS = 16, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def router(top_k: int = 1, drop_tokens: bool = False, noisy: bool = False, capacity_factor: float = 1.0) -> TopKRouter:
    torch.manual_seed(0)
    return TopKRouter(D_MODEL, EXPERTS, top_k, capacity_factor, capacity_factor, 0, drop_tokens, noisy)


def test_top2_slots_fill_first_choices_then_second_choices_in_token_order():
    # Expert 0 fills with the first choices of tokens 0, 1 (3 is late), then token 2's second choice is late too;
    # expert 1 with token 2's first choice, then token 0's second; token 3's second choice finds it full.
    experts = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    kept = keep_first_come(experts, num_experts=3, capacity=2)
    expected = torch.tensor([[True, True], [True, True], [True, False], [False, False]])
    assert torch.equal(kept, expected)


def test_capacity_rounds_like_deepspeed():
    assert deepspeed_capacity(4096, 64, 1.0, 4) == 64
    assert deepspeed_capacity(10, 4, 1.25, 0) == 4  # ceil(3.125)
    assert deepspeed_capacity(10, 4, 1.25, 8) == 8  # min_capacity wins


def skewed(layer: TopKRouter) -> torch.Tensor:
    """Tokens that share a direction the gate maps onto expert 0: nearly all pick it."""
    torch.manual_seed(1)
    direction = torch.randn(D_MODEL)
    with torch.no_grad():
        layer.gate.weight.normal_(std=0.05)
        layer.gate.weight[0] += direction
    return torch.randn(512, D_MODEL) * 0.3 + direction


def test_balance_loss_drives_a_skewed_router_towards_balance():
    layer = router()
    tokens = skewed(layer)
    layer(tokens)
    before = layer.last_stats["expert_fraction"].clone()
    assert before.max() > 0.9
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.02)
    for _ in range(100):
        optimizer.zero_grad()
        layer(tokens).balance_loss.backward()
        optimizer.step()
    after = layer(tokens).balance_loss
    fraction = layer.last_stats["expert_fraction"]
    assert fraction.max() < 0.4, fraction.tolist()  # 0.25 is perfect balance
    assert fraction.min() > 0.1, fraction.tolist()
    assert after < 1.1  # E * sum(p * f) is 1 when balanced


def test_z_loss_shrinks_router_logits_and_is_folded_into_the_aux_term():
    layer = router()
    tokens = skewed(layer) * 4
    first = layer(tokens).z_loss
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-3)
    for _ in range(20):
        optimizer.zero_grad()
        layer(tokens).z_loss.backward()
        optimizer.step()
    assert layer(tokens).z_loss < 0.5 * first
    spec = MoESpec(num_experts=EXPERTS, impl="ember", aux_loss_weight=0.01, z_loss_weight=0.001, drop_tokens=False)
    moe = EmberMoE(D_MODEL, 32, spec)
    _, aux = moe(tokens[:64])
    stats = moe.last_stats
    torch.testing.assert_close(aux, stats["balance_loss"] + 0.1 * stats["z_loss"])  # 0.001 / 0.01


def test_noisy_gating_samples_only_in_training_and_trains_its_noise():
    layer = router(top_k=2, noisy=True)
    tokens = torch.randn(256, D_MODEL)
    layer.eval()
    assert torch.equal(layer(tokens).experts, layer(tokens).experts)  # eval: deterministic
    clean = layer(tokens).experts
    layer.train()
    noisy = layer(tokens)
    assert not torch.equal(noisy.experts, clean)
    (noisy.weights.sum(dim=1) * torch.arange(256.0)).sum().backward()
    assert layer.noise.weight.grad is not None
    assert layer.noise.weight.grad.abs().sum() > 0


def test_stats_describe_the_routing():
    layer = router(top_k=2, drop_tokens=True, capacity_factor=0.5)
    routing = layer(torch.randn(200, D_MODEL))
    stats = layer.last_stats
    assert math.isclose(float(stats["expert_fraction"].sum()), 1.0, rel_tol=1e-6)
    dropped = (routing.experts == EXPERTS).float().mean()
    assert torch.equal(stats["dropped_fraction"], dropped)
    assert dropped > 0.3
    assert 0 < stats["router_entropy"] <= math.log(EXPERTS)
    assert int(routing.counts.sum()) == int((routing.experts < EXPERTS).sum())
    assert all(not value.requires_grad for value in stats.values())


def test_expert_choice_gives_every_expert_its_best_tokens():
    layer = TopKRouter(D_MODEL, EXPERTS, 2, 1.0, 1.0, 0, drop_tokens=True, expert_choice=True)
    routing = layer(torch.randn(64, D_MODEL))
    assert routing.counts.tolist() == [32] * EXPERTS  # ceil(64 / 4 * 2 * 1.0) each: balanced by construction
    assert routing.experts.shape == (64, EXPERTS)
    assert float(routing.balance_loss) == 0.0
    assert math.isclose(float(layer.last_stats["expert_fraction"].sum()), 1.0, rel_tol=1e-6)


def test_expert_choice_layer_equals_a_per_expert_loop():
    spec = MoESpec(num_experts=EXPERTS, top_k=1, capacity_factor=1.5, min_capacity=0, routing="expert_choice",
                   impl="ember")
    torch.manual_seed(3)
    moe = EmberMoE(D_MODEL, 32, spec)
    x = torch.randn(40, D_MODEL)
    out, _ = moe(x)
    probs = torch.softmax(moe.router.gate(x), dim=1)
    experts, count = moe.experts, EXPERTS
    b_in, b_out = experts.b_in.view(count, -1), experts.b_out.view(count, -1)
    expected = torch.zeros_like(x)
    for e in range(EXPERTS):  # each expert: its 15 highest-probability tokens, weighted by that probability
        for token in torch.topk(probs[:, e], 15).indices.tolist():
            hidden = torch.nn.functional.gelu(x[token] @ experts.w_in[e] + b_in[e], approximate="tanh")
            expected[token] += probs[token, e] * (hidden @ experts.w_out[e] + b_out[e])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
