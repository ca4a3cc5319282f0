"""Export gathers ZeRO shards and expert files into weights the plain single-process model runs identically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember.checkpoint.export import export_safetensors, load_exported
from ember.checkpoint.manager import CheckpointManager
from ember.engines import build_engine
from ember.engines.expert_groups import attach_expert_groups
from ember.engines.weights import full_state_dict
from ember.models import build_model
from ember.spec import JobSpec
from ember.train.objectives.lm import lm_loss, split_batch
from ember.world import local_world, world_from_env
from tests.helpers.corpus import text_rows
from tests.helpers.distributed import run_on_ranks

pytestmark = pytest.mark.distributed
SEQ, MICRO = 32, 4


def spec_dict(ep_size: int) -> dict:
    return {
        "name": "export-test",
        "model": {"d_model": 32, "n_heads": 4, "n_layers": 2, "seq_len": SEQ,
                  "moe": {"num_experts": 4, "ep_size": ep_size, "capacity_factor": 4.0, "eval_capacity_factor": 4.0,
                          "impl": "deepspeed"}},  # ember's layer: tests/distributed/test_moe_ep.py
        "data": {"train": {"urls": "unused.tar"}},
        "engine": {"kind": "deepspeed", "zero_stage": 2},
        "optim": {"lr": 1e-2},
        "schedule": {"steps": 3, "micro_batch": MICRO},
        "cluster": {"num_workers": 2, "device": "cpu"},
    }


def train_save_and_probe(rank: int, world_size: int, folder: str, spec_fields: dict) -> torch.Tensor:
    """Three ZeRO-2 EP=2 steps of `spec_fields`' MoE GPT, a checkpoint in `folder`, then one probe's logits."""
    spec = JobSpec.from_dict(spec_fields)
    world = world_from_env("cpu", ep_size=2)
    torch.manual_seed(0)
    engine = build_engine(spec, build_model(spec.model, world.expert_placement(spec.model), seed=0), world)
    for step in range(3):
        inputs, targets = split_batch(text_rows(4096 * (2 * step + rank), MICRO))
        loss, _ = lm_loss(engine.forward(inputs), targets, aux_weight=0.01)
        engine.backward(loss)
        engine.step()
    facts = {"spec": spec.model_dump(mode="json"), "engine": "deepspeed"}
    CheckpointManager(Path(folder) / "checkpoints", world, facts=facts).save(
        3, engine, {"data": {}, "world_size": world_size}, {"rng": None}
    )
    engine.module.eval()
    with torch.no_grad():  # the same probe on both ranks; experts exchange tokens over the EP group
        return engine.forward(split_batch(text_rows(100_000, MICRO))[0]).logits


def exported_logits(rank: int, world_size: int, exported: str) -> torch.Tensor:
    world = local_world()
    model, _ = load_exported(Path(exported))
    attach_expert_groups(model, world)
    model.eval()
    with torch.no_grad():
        return model(split_batch(text_rows(100_000, MICRO))[0]).logits


def test_export_of_expert_parallel_zero2_matches_the_sharded_model(tmp_path: Path) -> None:
    sharded = run_on_ranks(train_save_and_probe, 2, str(tmp_path), spec_dict(ep_size=2))
    torch.testing.assert_close(sharded[0], sharded[1], rtol=0, atol=0)
    out = tmp_path / "model.safetensors"
    export_safetensors(tmp_path, out, full_state_dict)
    (plain,) = run_on_ranks(exported_logits, 1, str(out))
    # Same weights, same routing; only GEMM blocking differs (experts see other batch shapes): fp32 rounding.
    torch.testing.assert_close(plain, sharded[0], rtol=1e-5, atol=1e-5)
    assert (plain - sharded[0]).abs().max() < 1e-5
    experts = [name for name in load_exported(out)[0].state_dict() if "deepspeed_experts" in name]
    assert {name.split("deepspeed_experts.")[1].split(".")[0] for name in experts} == {"0", "1", "2", "3"}
