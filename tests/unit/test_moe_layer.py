"""ember's MoE layer against references: DeepSpeed's MoE layer (capacity mode, same weights and inputs) and a
naive per-token loop (dropless); plus the checkpoint layouts both impls share."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.engines.deepspeed.moe import expose_to_deepspeed
from ember.engines.expert_groups import attach_expert_groups
from ember.models import build_model
from ember.models.layers.moe import EmberMoE
from ember.models.layers.moe.deepspeed_layer import build_deepspeed_moe
from ember.models.layers.moe.experts import RUNNERS
from ember.spec.model import GPTSpec, MoESpec
from ember.world import ExpertPlacement, Host, local_world

D_MODEL, D_FF, TOKENS = 16, 32, 96
# fp32, compared per tensor as max |actual - expected| <= TOLERANCE * max |expected|. Routing decisions are the
# same (bitwise-equal router logits) and so is the per-token arithmetic; only GEMM blocking differs (DeepSpeed
# runs [capacity, d] blocks padded with zeros, ember the rows each expert received). Measured over 5 seeds,
# top-1/2, capacity and dropless: outputs, input and router gradients bitwise equal, expert weight gradients
# (sums over tokens in another order) within 1.8e-6. Any routing, weighting or capacity difference moves
# values by >1e-2.
TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def process_group():
    local_world()  # DeepSpeed's gate asks torch.distributed for group sizes


pytestmark = pytest.mark.usefixtures("one_thread")


def moe_spec(**overrides) -> MoESpec:
    return MoESpec(**{"num_experts": 4, "top_k": 1, "min_capacity": 0, **overrides})


def layer_pair(spec: MoESpec, seed: int = 0):
    """DeepSpeed's layer with random weights, and ember's layer loaded from its state_dict."""
    torch.manual_seed(seed)
    reference = build_deepspeed_moe(D_MODEL, D_FF, spec.model_copy(update={"impl": "deepspeed"}), 0.0)
    for param in reference.parameters():
        torch.nn.init.normal_(param, std=0.3)  # a spread-out router, so capacity really drops tokens
    attach_expert_groups(reference, local_world())
    ember = EmberMoE(D_MODEL, D_FF, spec.model_copy(update={"impl": "ember"}))
    ember.load_state_dict(reference.state_dict(), strict=True)  # DeepSpeed's layout loads into ember's
    return reference, ember


def run(layer, x: torch.Tensor, train: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Output, aux loss and the gradients of a fixed scalar of both, named as DeepSpeed names its parameters."""
    layer.train(train)
    x = x.clone().requires_grad_()
    out, aux, *_ = layer(x)
    probe = torch.linspace(-1, 1, out.numel()).view_as(out)
    (torch.sum(out * probe) + aux).backward()
    if isinstance(layer, EmberMoE):
        grads = {"deepspeed_moe.gate.wg.weight": layer.router.gate.weight.grad, **_expert_grads(layer)}
    else:
        grads = {name: p.grad for name, p in layer.named_parameters()}
    return out.detach(), aux.detach(), {"input": x.grad, **grads}


def _expert_grads(layer: EmberMoE) -> dict[str, torch.Tensor]:
    """The stacked gradients in nn.Linear layout, one entry per expert and parameter."""
    experts, count = layer.experts, layer.num_local_experts
    per_param = {
        "fc.weight": experts.w_in.grad.transpose(1, 2), "fc.bias": experts.b_in.grad.view(count, -1),
        "proj.weight": experts.w_out.grad.transpose(1, 2), "proj.bias": experts.b_out.grad.view(count, -1),
    }
    return {f"deepspeed_moe.experts.deepspeed_experts.{e}.{name}": grad[e]
            for e in range(count) for name, grad in per_param.items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    error, scale = (actual - expected).abs().max(), expected.abs().max()
    assert error <= TOLERANCE * scale, f"{name}: max error {error:.3g} at scale {scale:.3g}"


def assert_same(actual, expected) -> None:
    (out_a, aux_a, grads_a), (out_e, aux_e, grads_e) = actual, expected
    assert_close(out_a, out_e, "output")
    assert_close(aux_a, aux_e, "aux loss")
    assert grads_a.keys() == grads_e.keys()
    for name in grads_e:
        assert_close(grads_a[name], grads_e[name], name)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_capacity_mode_matches_deepspeed_outputs_and_gradients(top_k, capacity_factor):
    reference, ember = layer_pair(moe_spec(top_k=top_k, capacity_factor=capacity_factor, eval_capacity_factor=0.7))
    x = torch.randn(3, TOKENS // 3, D_MODEL)
    assert_same(run(ember, x), run(reference, x))
    assert ember.last_stats["dropped_fraction"] > 0  # the comparison covers dropped tokens
    assert_same(run(ember, x, train=False), run(reference, x, train=False))  # eval capacity factor


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_matches_deepspeed_dropless(top_k):
    reference, ember = layer_pair(moe_spec(top_k=top_k, drop_tokens=False), seed=1)
    x = torch.randn(TOKENS, D_MODEL)
    assert_same(run(ember, x), run(reference, x))
    assert ember.last_stats["dropped_fraction"] == 0


def naive_moe(layer: EmberMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax gate, top-k, renormalise (k=2), weighted sum of the chosen experts' MLPs."""
    experts, count = layer.experts, layer.num_local_experts
    b_in, b_out = experts.b_in.view(count, -1), experts.b_out.view(count, -1)
    outputs = []
    for token in x:
        probs = F.softmax(layer.router.gate(token), dim=-1)
        weights, chosen = torch.topk(probs, layer.router.top_k)
        weights = weights / weights.sum() if layer.router.top_k == 2 else weights
        out = torch.zeros_like(token)
        for weight, e in zip(weights, chosen.tolist(), strict=True):
            hidden = F.gelu(token @ experts.w_in[e] + b_in[e], approximate="tanh")
            out = out + weight * (hidden @ experts.w_out[e] + b_out[e])
        outputs.append(out)
    return torch.stack(outputs)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("backend", sorted(RUNNERS))
def test_dropless_equals_a_per_token_loop(top_k, backend):
    _, layer = layer_pair(moe_spec(num_experts=8, top_k=top_k, drop_tokens=False), seed=2)
    layer.experts.backend = backend
    x = torch.randn(TOKENS, D_MODEL, requires_grad=True)
    out, _ = layer(x)
    expected = naive_moe(layer, x)
    assert_close(out, expected, "output")
    params = [x, *layer.experts.parameters(), layer.router.gate.weight]
    probe = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, params, probe), torch.autograd.grad(expected, params, probe),
                         strict=True):
        assert_close(got, want, "gradient")


def test_expert_parallel_ranks_hold_slices_of_the_single_rank_experts():
    def build(ep_size: int, ep_rank: int):
        spec = GPTSpec.model_validate({"d_model": 16, "n_heads": 2, "n_layers": 2, "seq_len": 8,
                                       "moe": {"num_experts": 4, "ep_size": ep_size, "impl": "ember"}})
        return build_model(spec, ExpertPlacement(4, ep_size, ep_rank), seed=3).blocks[1].ffn.moe.experts

    whole = build(1, 0)
    halves = [build(2, rank) for rank in (0, 1)]
    for name in ("w_in", "b_in", "w_out", "b_out"):
        joined = torch.cat([getattr(half, name) for half in halves])
        assert torch.equal(joined, getattr(whole, name)), name


@pytest.mark.parametrize("impl", ["ember", "deepspeed"])
def test_both_impls_build_the_same_gpt_from_the_same_seed(impl):
    def build(which: str):
        spec = GPTSpec.model_validate({"d_model": 16, "n_heads": 2, "n_layers": 2, "seq_len": 8,
                                       "moe": {"num_experts": 4, "top_k": 2, "impl": which, "residual": True}})
        model = build_model(spec, seed=5)
        attach_expert_groups(model, local_world())
        return model

    other = "deepspeed" if impl == "ember" else "ember"
    model, twin = build(impl), build(other)
    twin.load_state_dict(model.state_dict(), strict=True)  # either layout loads into either impl
    tokens = torch.randint(0, 256, (2, 8))
    assert_close(model(tokens).logits, twin(tokens).logits, "logits")
    fresh = build(other)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), twin.state_dict().values(),
                                                 strict=True))  # same seed, same weights


def test_deepspeed_layout_is_written_only_once_exposed():
    layer = EmberMoE(D_MODEL, D_FF, moe_spec(impl="ember"))
    assert "experts.w_in" in layer.state_dict()
    expose_to_deepspeed(layer)
    keys = layer.state_dict().keys()
    assert "deepspeed_moe.experts.deepspeed_experts.3.proj.bias" in keys
    assert "experts.w_in" not in keys
    assert "deepspeed_moe.gate.wg.weight" in keys


def test_reused_gradient_memory_never_overwrites_a_gradient_in_use():
    _, layer = layer_pair(moe_spec(drop_tokens=False), seed=4)
    x = torch.randn(TOKENS, D_MODEL)

    def backward(scale: float) -> None:
        out, _ = layer(x * scale)
        out.sum().backward()

    backward(1.0)
    first = layer.experts.w_in.grad.clone()
    backward(1.0)  # accumulates into the .grad the first backward left
    torch.testing.assert_close(layer.experts.w_in.grad, 2 * first)
    held = layer.experts.w_in.grad
    layer.zero_grad(set_to_none=True)
    backward(2.0)  # `held` is still referenced here, so its memory must not be handed out again
    torch.testing.assert_close(held, 2 * first)
    pointers = {buffer.data_ptr() for buffer in layer.experts.grad_memory[0].buffers}
    del held
    layer.zero_grad(set_to_none=True)
    backward(1.0)  # now the memory is free for reuse, and the result is still right
    torch.testing.assert_close(layer.experts.w_in.grad, first)
    assert layer.experts.w_in.grad.data_ptr() in pointers  # reused: no fresh pages to fault in


@pytest.mark.parametrize("impl", ["ember", "deepspeed"])
def test_pyramid_moe_gives_deeper_layers_more_experts(impl):
    spec = GPTSpec.model_validate({"d_model": 16, "n_heads": 2, "n_layers": 4, "seq_len": 8, "moe": {
        "experts_per_layer": [2, 4], "top_k": 2, "ep_size": 2, "impl": impl, "residual": True}})
    model = build_model(spec, ExpertPlacement(4, 2, 1), seed=0)  # built only: ep_size=2 needs two ranks to run
    assert [block.ffn.placement.num_local for block in model.blocks[1::2]] == [1, 2]  # ep_size=2 halves 2 and 4
    assert [block.ffn.placement.first_expert for block in model.blocks[1::2]] == [1, 2]
    whole = build_model(spec.model_copy(update={"moe": spec.moe.model_copy(update={"ep_size": 1})}), seed=0)
    attach_expert_groups(whole, local_world())
    pyramid = sum(p.numel() for p in whole.parameters())
    flat = build_model(spec.model_copy(update={"moe": spec.moe.model_copy(update={"ep_size": 1,
                                                                               "experts_per_layer": None,
                                                                               "num_experts": 4})}), seed=0)
    assert pyramid < sum(p.numel() for p in flat.parameters())
    assert whole(torch.randint(0, 256, (2, 8))).logits.shape == (2, 8, 256)


def test_expert_placement_gives_each_ep_rank_a_contiguous_block_and_records_hosts():
    hosts = tuple(Host(f"node{r // 2}", f"10.0.0.{r // 2}", None) for r in range(4))
    placement = ExpertPlacement(8, ep_size=2, ep_rank=1, hosts=hosts)
    assert list(placement.local_experts) == [4, 5, 6, 7]
    assert [placement.ep_rank_of(e) for e in range(8)] == [0] * 4 + [1] * 4
    assert list(placement.for_experts(2).local_experts) == [1]  # a PR-MoE layer with 2 experts
    assert list(placement.replica_ranks(1, world_size=4)) == [1, 3]
    record = placement.record({1: 8, 3: 2})
    assert record["layers"]["3"] == {"0": 0, "1": 1}
    assert [(r["ep_rank"], r["host"], r["ip"]) for r in record["ranks"]] == [
        (0, "node0", "10.0.0.0"), (1, "node0", "10.0.0.0"), (0, "node1", "10.0.0.1"), (1, "node1", "10.0.0.1")]
    with pytest.raises(ValueError, match="ep_size=3"):
        ExpertPlacement(8, ep_size=3)
