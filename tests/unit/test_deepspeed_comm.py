"""DeepSpeed's communication backend starts on ember's process group without compiling anything, and a ZeRO
engine builds without importing inductor's compiler."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.helpers.distributed import run_on_ranks


def start_deepspeed_comm(rank: int, world_size: int, extensions: str) -> dict[str, Any]:
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions  # where a JIT build of a DeepSpeed op would land
    from deepspeed.comm import comm

    from ember.engines.deepspeed.comm import init_deepspeed_comm
    from ember.world import world_from_env

    init_deepspeed_comm(world_from_env("cpu").backend)
    return {"backend_started": comm.is_initialized(), "shared_memory_op": comm.cdb.shm_comm_op}


def test_deepspeed_comm_starts_without_building_the_shared_memory_op(tmp_path: Path) -> None:
    (result,) = run_on_ranks(start_deepspeed_comm, 1, str(tmp_path), timeout_s=120)
    assert result["backend_started"]
    assert result["shared_memory_op"] is None
    assert list(tmp_path.iterdir()) == []  # deepspeed_shm_comm/ appears here when DeepSpeed compiles it


def build_zero2_engine_and_step(rank: int, world_size: int) -> dict[str, Any]:
    import sys

    import torch
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    from ember.engines.base import build_engine
    from ember.models import build_model
    from ember.spec import JobSpec
    from ember.train.objectives.lm import lm_loss, split_batch
    from ember.world import world_from_env

    spec = JobSpec.from_dict({
        "name": "no-inductor",
        "model": {"d_model": 32, "n_heads": 4, "n_layers": 2, "seq_len": 16},
        "data": {"train": {"urls": "unused-the-test-feeds-a-batch"}},
        "engine": {"kind": "deepspeed", "zero_stage": 2},
        "schedule": {"steps": 2, "micro_batch": 2, "global_batch": 2},
        "cluster": {"num_workers": 1, "device": "cpu"},
    })
    world = world_from_env("cpu")
    engine = build_engine(spec, build_model(spec.model, world.expert_placement(spec.model), seed=0), world)
    inputs, targets = split_batch(torch.arange(2 * 17).reshape(2, 17))
    loss, _ = lm_loss(engine.forward(inputs), targets, aux_weight=0.0)
    engine.backward(loss)
    engine.step()
    return {
        # is_zero_supported_optimizer adds Muon to this list when it imports it: DeepSpeed's check ran
        "zero_check_added_muon": any(kind.__name__ == "MuonWithAuxAdam" for kind in ZERO_SUPPORTED_OPTIMIZERS),
        "inductor_compiler_imported": "torch._inductor.compile_fx" in sys.modules,
        "default_backend": torch.compiler.get_default_backend(),
        "loss": loss.item(),
    }


def test_a_zero_engine_builds_and_steps_without_importing_inductors_compiler() -> None:
    """DeepSpeed's ZeRO check imports its Muon optimizer, whose torch.compile decorators would import inductor's
    compiler in every rank (comm.import_muon_without_inductor); torch's default backend is left as it was."""
    (result,) = run_on_ranks(build_zero2_engine_and_step, 1, timeout_s=180)
    assert result["zero_check_added_muon"]
    assert not result["inductor_compiler_imported"]
    assert result["default_backend"] == "inductor"
    assert 0 < result["loss"] < 10
