"""A small trained MoE GPT checkpoint in ember's run layout, written by real DeepSpeed ranks (no Ray).

    run_dir = write_moe_checkpoint(tmp_path, ep_size=2)   # run_dir/checkpoints/step_000008/

Two gloo ranks train a tiny ember-MoE GPT (4 experts, EP=ep_size, ZeRO-2) for a few steps on Python's own
source and save through CheckpointManager with the facts `ember run` records (spec, expert placement).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ember.checkpoint.manager import CheckpointManager
from ember.engines import build_engine
from ember.models import build_model
from ember.spec import JobSpec
from ember.train.loop import placement_record
from ember.train.objectives.lm import lm_loss, split_batch
from ember.world import gather_hosts, world_from_env
from tests.helpers.corpus import text_rows
from tests.helpers.distributed import run_on_ranks

SEQ, MICRO, STEPS = 32, 8, 8


TINY_MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 2, "seq_len": SEQ}


def tiny_moe_spec(ep_size: int, model: dict | None = None) -> dict:
    fields = dict(model or TINY_MODEL)
    moe = {"num_experts": 4, "ep_size": ep_size, "capacity_factor": 4.0, **fields.pop("moe", {})}
    return {
        "name": "serve-test",
        "model": {**fields, "moe": moe},
        "data": {"train": {"urls": "unused.tar"}},
        "engine": {"kind": "deepspeed", "zero_stage": 2},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "schedule": {"steps": STEPS, "micro_batch": MICRO},
        "cluster": {"num_workers": 2, "device": "cpu"},
    }


def _train_and_save(rank: int, world_size: int, run_dir: str, ep_size: int, model: dict | None) -> None:
    spec = JobSpec.from_dict(tiny_moe_spec(ep_size, model))
    world = world_from_env("cpu", ep_size=ep_size)
    torch.manual_seed(0)
    engine = build_engine(spec, build_model(spec.model, world.expert_placement(spec.model), seed=0), world)
    for step in range(STEPS):
        inputs, targets = split_batch(text_rows(MICRO * (SEQ + 1) * (2 * step + rank), MICRO))
        loss, _ = lm_loss(engine.forward(inputs), targets, aux_weight=0.01)
        engine.backward(loss)
        engine.step()
    facts = {
        "spec": spec.model_dump(mode="json"),
        "engine": "deepspeed",
        "placement": placement_record(spec, world.expert_placement(spec.model, gather_hosts(world))),
    }
    CheckpointManager(Path(run_dir) / "checkpoints", world, facts=facts).save(
        STEPS, engine, {"data": {}, "world_size": world_size}, {"rng": None}
    )


def write_moe_checkpoint(run_dir: Path, ep_size: int = 2, model: dict | None = None) -> Path:
    """`model`: GPT fields (d_model, n_heads, n_layers, seq_len ...) instead of the tiny default; seq_len >= 32.
    Its `moe` entries (top_k, every_n_layers ...) override the default 4 experts."""
    run_on_ranks(_train_and_save, 2, str(run_dir), ep_size, model)
    return run_dir
