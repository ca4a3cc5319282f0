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
