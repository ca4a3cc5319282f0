"""The new MoE options under expert parallelism, on 2 gloo ranks: SwiGLU experts without biases, top-3 of 4 with
sigmoid scoring, a shared expert and DeepSeek-V3 bias balancing train under DeepSpeed ZeRO-2 with ep_size=2 like
ep_size=1 (losses and the balancing bias, equal on every rank); the EP=2 checkpoint resumes on ep_size=1 and
exports to the plain single-process model, both with the sharded model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember.checkpoint.export import export_safetensors
from ember.checkpoint.manager import CheckpointManager
from ember.engines import build_engine
from ember.engines.weights import full_state_dict
from ember.models import build_model
from ember.models.layers.moe.router import update_balance_biases
from ember.spec import JobSpec
from ember.train.objectives.lm import lm_loss, split_batch
from ember.world import world_from_env
from tests.distributed.test_engines import LOSS_RTOL, Run, batch, corpus, quiet_rank, spec_dict
from tests.distributed.test_export import exported_logits, text_rows
from tests.helpers.distributed import run_on_ranks

pytestmark = pytest.mark.distributed
STEPS = 5
OPTIONS = {"num_experts": 4, "top_k": 3, "every_n_layers": 2, "drop_tokens": False, "scoring": "sigmoid",
           "shared_experts": 1, "balance": "bias", "bias_update_rate": 0.01}
BLOCKS = {"mlp": "swiglu", "bias": False, "norm": "rmsnorm", "position": "rope"}
EP2 = Run("options-zero2-ep2", {"kind": "deepspeed", "zero_stage": 2}, OPTIONS | {"ep_size": 2})
EP1 = Run("options-zero0-ep1", {"kind": "deepspeed", "zero_stage": 0}, OPTIONS | {"ep_size": 1})
EP1_ZERO2 = Run("options-zero2-ep1", {"kind": "deepspeed", "zero_stage": 2}, OPTIONS | {"ep_size": 1})


def with_blocks(run: Run) -> JobSpec:
    raw = spec_dict(run)
    raw["model"] |= BLOCKS
    return JobSpec.from_dict(raw)


def build_run(run: Run):
    spec = with_blocks(run)
    world = world_from_env("cpu", ep_size=run.ep_size)
    torch.manual_seed(0)
    return spec, world, build_engine(spec, build_model(spec.model, world.expert_placement(spec.model), seed=0), world)


def probe(engine) -> torch.Tensor:
    engine.module.eval()
    with torch.no_grad():
        return engine.forward(split_batch(text_rows(100_000, 4))[0]).logits


def resumed_on_ep1(folder: Path) -> dict:
    """The EP=2 checkpoint loaded (resharded) into ep_size=1: the same function and balancing bias."""
    _, world, engine = build_run(EP1_ZERO2)
    engine.load(next((folder / "checkpoints").glob("step_*")) / "engine")
    result = {"probe": probe(engine), "bias": engine.module.blocks[1].ffn.moe.router.score_bias.clone()}
    world.barrier()
    return result


def train_with_balancing(rank: int, run: Run, folder: Path) -> dict:
    spec, world, engine = build_run(run)
    tokens, losses = corpus(), []
    for step in range(STEPS):
        for micro in range(spec.grad_accumulation):
            inputs, targets = split_batch(batch(tokens, rank, step, micro, spec.model.seq_len))
            loss, _ = lm_loss(engine.forward(inputs), targets, spec.model.moe.aux_loss_weight)
            engine.backward(loss)
            losses.append(loss.item())
        engine.step()
        update_balance_biases(engine.module)  # as the LM objective does after every step
    result = {"loss": losses, "bias": engine.module.blocks[1].ffn.moe.router.score_bias.clone()}
    if run is EP2:
        facts = {"spec": spec.model_dump(mode="json"), "engine": "deepspeed"}
        CheckpointManager(folder / "checkpoints", world, facts=facts).save(
            STEPS, engine, {"data": {}, "world_size": world.world_size}, {"rng": None}
        )
        result["probe"] = probe(engine)
    world.barrier()
    return result


def both_runs(rank: int, world_size: int, folder: str) -> dict:
    quiet_rank()
    results = {run.name: train_with_balancing(rank, run, Path(folder)) for run in (EP1, EP2)}
    return results | {"resumed": resumed_on_ep1(Path(folder))}


def test_new_moe_options_train_alike_under_ep2_and_export(tmp_path: Path) -> None:
    ranks = run_on_ranks(both_runs, 2, str(tmp_path))
    for result in ranks:
        torch.testing.assert_close(torch.tensor(result[EP2.name]["loss"]), torch.tensor(result[EP1.name]["loss"]),
                                   rtol=LOSS_RTOL * 10, atol=0)
        torch.testing.assert_close(result[EP2.name]["bias"], result[EP1.name]["bias"])
    assert torch.equal(ranks[0][EP2.name]["bias"], ranks[1][EP2.name]["bias"])  # one bias, all-reduced loads
    assert ranks[0][EP2.name]["bias"].abs().sum() > 0
    for result in ranks:  # resumed on another EP size
        torch.testing.assert_close(result["resumed"]["probe"], ranks[0][EP2.name]["probe"], rtol=1e-5, atol=1e-5)
        assert torch.equal(result["resumed"]["bias"], ranks[0][EP2.name]["bias"])
    out = tmp_path / "model.safetensors"
    export_safetensors(tmp_path, out, full_state_dict)
    (plain,) = run_on_ranks(exported_logits, 1, str(out))
    torch.testing.assert_close(plain, ranks[0][EP2.name]["probe"], rtol=1e-5, atol=1e-5)


def every_token_to_expert_0(rank: int, world_size: int, mlp: str) -> dict[str, torch.Tensor]:
    """EP=2, every token of both ranks routed to expert 0 (on rank 0): rank 1 receives no rows at all, and both
    ranks must still run the same backward all-to-alls. Returns this rank's input and expert-weight gradients."""
    from ember.engines.expert_groups import attach_expert_groups
    from ember.models.layers.moe import EmberMoE
    from ember.spec.model import MoESpec
    from ember.world import ExpertPlacement

    world = world_from_env("cpu", ep_size=2)
    spec = MoESpec(num_experts=4, top_k=1, ep_size=2, drop_tokens=False)
    torch.manual_seed(0)
    layer = EmberMoE(16, 32, spec, ExpertPlacement(4, 2, world.ep_rank), mlp=mlp)
    attach_expert_groups(layer, world)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([1.0, -1.0, -1.0, -1.0]).repeat_interleave(16).view(4, 16))
    x = (torch.rand(24, 16) + 0.1).requires_grad_()  # positive rows: expert 0's score is the highest for each
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    grads = {name: p.grad for name, p in layer.experts.named_parameters()}
    assert all(g is not None for g in grads.values()), "an expert weight got no gradient"
    return {"x": x.grad, **grads}


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_a_rank_that_receives_no_rows_runs_the_same_backward_exchange(mlp):
    """Was a deadlock with SwiGLU experts: rank 1's empty expert output did not depend on its input, so its backward
    skipped the all-to-alls rank 0 waited in."""
    rank0, rank1 = run_on_ranks(every_token_to_expert_0, 2, mlp, timeout_s=120)
    assert rank0["x"].abs().sum() > 0 and rank1["x"].abs().sum() > 0  # rank 1's tokens got their gradient back
    assert all(g.abs().sum() == 0 for name, g in rank1.items() if name != "x")  # its experts saw no rows
    assert any(g.abs().sum() > 0 for name, g in rank0.items() if name != "x")
