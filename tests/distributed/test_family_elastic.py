"""The image families resume on another world size: a checkpoint saved by 2 ranks loads on 1 rank, tensor
for tensor, in every engine and EMA copy.

- diffusion: a DiT whose MoE block's experts are split over the 2 ranks (ep_size 2, DeepSpeed ZeRO-2), its
  EMA copy too; the 1-rank run holds every expert (ep_size 1).
- GAN: two DeepSpeed engines (G at ZeRO-1, D at ZeRO-2) and the EMA of G.

Two spawns per family: 2 ranks train a few steps on real digits, save the objective's parts and report the
tensors they hold; 1 rank builds the same networks, loads the folder and reports what it holds, then trains
on. Dense tensors must equal every saving rank's; expert tensors the EP ranks' halves joined, bitwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ember.data.formats import ImageBatch
from ember.evaluate.classifier import digit_split
from ember.spec import JobSpec
from ember.train.loop import seed_everything
from ember.train.objectives.base import build_objective
from ember.world import world_from_env
from tests.distributed.test_engines import quiet_rank
from tests.helpers.distributed import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
GLOBAL_BATCH, STEPS = 32, 3
EXPERTS = ("experts.w_in", "experts.b_in", "experts.w_out", "experts.b_out")
FAMILIES = {
    "diffusion": ("tiny-diffusion", lambda ep: [
        "model={family: diffusion, backbone: dit, width: 32, depth: 2, heads: 4, patch_size: 2, timesteps: 100, "
        f"sample_steps: 5, ema: {{decay: 0.9}}, moe: {{num_experts: 4, every_n_layers: 2, ep_size: {ep}, "
        "impl: ember}}", "engine={kind: deepspeed, zero_stage: 2}"]),
    "gan": ("tiny-gan", lambda ep: [
        "engine={kind: deepspeed, zero_stage: 1, grad_clip: null}",
        "model.discriminator.engine={kind: deepspeed, zero_stage: 2, grad_clip: 1.0}"]),
}


def spec_for(family: str, world_size: int) -> JobSpec:
    job, overrides = FAMILIES[family]
    return JobSpec.load(REPO / "jobs" / "debug" / f"{job}.yaml", [
        *overrides(world_size), f"cluster.num_workers={world_size}",
        f"schedule.micro_batch={GLOBAL_BATCH // world_size}", f"schedule.global_batch={GLOBAL_BATCH}",
    ])


def batches(rank: int, world_size: int, micro: int):
    """Real training digits, each rank its own rows, a new slice every call."""
    (images, labels), _ = digit_split(8)
    start = 0
    while True:
        rows = slice(start + rank * micro, start + (rank + 1) * micro)
        yield ImageBatch(images[rows], labels[rows], [None] * micro)
        start += world_size * micro


def build(family: str, world_size: int):
    quiet_rank()
    spec = spec_for(family, world_size)
    moe = spec.model.moe
    world = world_from_env("cpu", ep_size=moe.ep_size if moe else 1)
    seed_everything(spec.schedule.seed)  # as the Trainer does: every rank builds the same dense weights
    return spec, build_objective(spec, world)


def held(objective) -> dict[str, dict[str, torch.Tensor]]:
    """Every engine's weights and every EMA copy, experts stacked ([E_local, ...]) as the layers hold them."""
    found = {f"engine {name}": {k: v.detach().clone() for k, v in engine.module.named_parameters()}
             for name, engine in objective.engines.items()}
    found.update({f"ema {name}": {k: v.clone() for k, v in ema.module.state_dict().items()}
                  for name, ema in objective.parts.emas.items()})
    found["buffers"] = {f"ema {name}": {k for k, _ in ema.module.named_buffers()}
                        for name, ema in objective.parts.emas.items()}
    return found


def train_and_save(rank: int, world_size: int, family: str, folder: str) -> dict[str, Any]:
    spec, objective = build(family, world_size)
    data = batches(rank, world_size, spec.schedule.micro_batch)
    for step in range(STEPS):
        objective.train_step(lambda: next(data), step)
    objective.parts.save(Path(folder))
    return held(objective)


def load_and_train(rank: int, world_size: int, family: str, folder: str) -> dict[str, Any]:
    spec, objective = build(family, world_size)
    objective.parts.load(Path(folder))
    loaded = held(objective)
    data = batches(rank, world_size, spec.schedule.micro_batch)
    means, _ = objective.train_step(lambda: next(data), STEPS)
    return {"held": loaded, "losses": {name: float(value) for name, value in means.items()}}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_checkpoint_of_2_ranks_loads_on_1_rank_with_every_engine_and_ema_tensor(family: str, tmp_path: Path):
    saved = run_on_ranks(train_and_save, 2, family, str(tmp_path))
    assert (tmp_path / "ema.pt").is_file()
    resumed = run_on_ranks(load_and_train, 1, family, str(tmp_path))[0]
    whole, buffers = resumed["held"], resumed["held"].pop("buffers")
    for rank in saved:
        del rank["buffers"]
    assert set(whole) == set(saved[0])
    assert len(whole) == (2 if family == "diffusion" else 3)
    experts = 0
    for part, tensors in whole.items():
        halves = [rank[part] for rank in saved]
        assert set(tensors) == set(halves[0]), part
        for name, tensor in tensors.items():
            if name.endswith(EXPERTS):  # EP rank 0 held experts 0-1, EP rank 1 experts 2-3
                experts += 1
                assert not torch.equal(halves[0][name], halves[1][name]), name
                assert torch.equal(tensor, torch.cat([halves[0][name], halves[1][name]])), f"{part}: {name}"
            elif name in buffers.get(part, ()):  # BatchNorm statistics: each rank's own batches; rank 0's saved
                assert torch.equal(tensor, halves[0][name]), f"{part}: {name}"
            else:
                assert torch.equal(tensor, halves[0][name]), f"{part}: {name}"
                assert torch.equal(tensor, halves[1][name]), f"{part}: {name}"
    assert experts == (8 if family == "diffusion" else 0)  # 4 stacked tensors, in the engine and the EMA
    network = "model" if family == "diffusion" else "generator"
    trained, averaged = whole[f"engine {network}"], whole[f"ema {network}"]
    assert sum(not torch.equal(averaged[name], trained[name]) for name in trained) > len(trained) // 2  # not mixed up
    assert all(0 < loss < 5 for loss in resumed["losses"].values()), resumed["losses"]
