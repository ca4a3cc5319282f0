"""Every engine trains the same function: same losses as DDP on the same data, and exact resume.

Two gloo ranks on CPU. All runs of one world share a spawn (starting ranks and importing DeepSpeed is
most of the cost): the `curves` fixture trains every engine for STEPS steps, saving after SAVE_AT; the
`resumed` fixture starts fresh ranks that load those checkpoints and replay the next steps.
Data is real text: windows of the bytes of Python standard-library sources.
"""

from __future__ import annotations

import argparse
import inspect
import json.decoder
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ember.engines.base import build_engine
from ember.engines.deepspeed import deepspeed_config
from ember.errors import UserError
from ember.models import build_model
from ember.spec import JobSpec
from ember.train.objectives.lm import lm_loss, split_batch
from ember.world import World, world_from_env
from tests.helpers.distributed import run_on_ranks

pytestmark = pytest.mark.distributed

WORLD_SIZE, MICRO_BATCH, ACCUMULATION, STEPS = 2, 4, 2, 10
GLOBAL_BATCH = MICRO_BATCH * ACCUMULATION * WORLD_SIZE
SAVE_AT, REPLAY = 4, 3  # save after step 4, compare the next 3 steps against a resumed run
SOURCES = (inspect.__file__, json.decoder.__file__, textwrap.__file__, argparse.__file__)

# fp32 on CPU. The engines sum gradients in different orders (buckets, partitions, reduce-scatter), so they
# agree to float32 rounding, not bitwise. Measured over 10 steps: losses within 6e-8, grad norms within 3e-7
# (relative); the tolerances leave ~10x headroom and would catch any real difference (a missed sync,
# a wrong accumulation scale or clip, a skipped scheduler step all move the loss by >1e-3).
LOSS_RTOL, NORM_RTOL = 1e-6, 3e-6


@dataclass(frozen=True)
class Run:
    name: str
    engine: dict[str, Any]
    moe: dict[str, Any] | None = None
    grad_clip: float | None = 1.0

    @property
    def ep_size(self) -> int:
        return self.moe["ep_size"] if self.moe else 1


def spec_dict(run: Run) -> dict[str, Any]:
    return {
        "name": f"engines-{run.name}",
        "model": {"d_model": 32, "n_heads": 4, "n_layers": 2, "seq_len": 32, "moe": run.moe},
        "data": {"train": {"urls": "unused-the-test-feeds-batches"}},
        "engine": {**run.engine, "grad_clip": run.grad_clip},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1, "warmup_steps": 3, "schedule": "cosine"},
        "schedule": {"steps": STEPS, "micro_batch": MICRO_BATCH, "global_batch": GLOBAL_BATCH},
        "cluster": {"num_workers": WORLD_SIZE, "device": "cpu"},
    }


def job_spec(run: Run) -> JobSpec:
    return JobSpec.from_dict(spec_dict(run))


def moe(ep_size: int) -> dict[str, Any]:
    # Dropless routing: every token reaches its expert whatever the capacity, so ep_size 1 and 2 agree.
    return {"num_experts": 4, "top_k": 1, "every_n_layers": 2, "ep_size": ep_size, "drop_tokens": False}


DENSE = {
    "ddp": Run("ddp", {"kind": "ddp"}),
    **{f"zero{stage}": Run(f"zero{stage}", {"kind": "deepspeed", "zero_stage": stage}) for stage in range(4)},
    "fsdp": Run("fsdp", {"kind": "fsdp"}),
    "fairscale": Run("fairscale", {"kind": "fairscale", "mode": "sharded_ddp"}),
}
MOE = {
    "moe-zero2-ep2": Run("moe-zero2-ep2", {"kind": "deepspeed", "zero_stage": 2}, moe(2)),
    "moe-zero0-ep1": Run("moe-zero0-ep1", {"kind": "deepspeed", "zero_stage": 0}, moe(1)),
    "moe-zero2-ep1": Run("moe-zero2-ep1", {"kind": "deepspeed", "zero_stage": 2}, moe(1)),
    "moe-ddp-ep1": Run("moe-ddp-ep1", {"kind": "ddp"}, moe(1)),
    "moe-fsdp-ep1": Run("moe-fsdp-ep1", {"kind": "fsdp"}, moe(1)),
    "moe-fairscale-ep1": Run("moe-fairscale-ep1", {"kind": "fairscale"}, moe(1)),
}
RESUMED = [*DENSE, "moe-zero2-ep2"]


# ---- what every rank runs -------------------------------------------------------------------------


def corpus() -> torch.Tensor:
    data = b"".join(Path(path).read_bytes() for path in SOURCES)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batch(tokens: torch.Tensor, rank: int, step: int, micro: int, seq_len: int) -> torch.Tensor:
    """[micro_batch, seq_len + 1] windows, a pure function of (rank, step, micro)."""
    generator = torch.Generator().manual_seed(1_000_003 * rank + 1_009 * step + micro)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (MICRO_BATCH,), generator=generator).tolist()
    return torch.stack([tokens[start : start + seq_len + 1] for start in starts])


def train(engine, spec: JobSpec, rank: int, steps: range, tokens: torch.Tensor) -> dict[str, list[float]]:
    aux_weight = spec.model.moe.aux_loss_weight if spec.model.moe else 0.0
    record: dict[str, list[float]] = {"loss": [], "grad_norm": [], "lr": []}
    for step in steps:
        losses = []
        for micro in range(spec.grad_accumulation):
            inputs, targets = split_batch(batch(tokens, rank, step, micro, spec.model.seq_len))
            loss, _ = lm_loss(engine.forward(inputs), targets, aux_weight)
            engine.backward(loss)
            losses.append(loss.item())
        record["loss"].append(sum(losses) / len(losses))
        record["lr"].append(engine.lr())
        record["grad_norm"].append(engine.step())
    return record


def build(run: Run):
    spec = job_spec(run)
    world = world_from_env("cpu", ep_size=run.ep_size)
    torch.manual_seed(0)
    model = build_model(spec.model, world.expert_placement(spec.model), seed=0)
    return spec, world, build_engine(spec, model, world)


def quiet_rank() -> None:
    torch.set_num_threads(1)  # two ranks on a two-core machine
    warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations inside FSDP2 collectives


def train_and_save(rank: int, world_size: int, runs: list[Run], folder: str) -> dict[str, dict]:
    quiet_rank()
    tokens, results = corpus(), {}
    for run in runs:
        spec, world, engine = build(run)
        results[run.name] = train(engine, spec, rank, range(SAVE_AT), tokens)
        checkpoint = Path(folder) / run.name
        checkpoint.mkdir(parents=True, exist_ok=True)
        engine.save(checkpoint)
        later = train(engine, spec, rank, range(SAVE_AT, STEPS), tokens)
        for key, values in later.items():
            results[run.name][key] += values
        world.barrier()
    return results


def load_and_replay(rank: int, world_size: int, runs: list[Run], folder: str) -> dict[str, dict]:
    quiet_rank()
    tokens, results = corpus(), {}
    for run in runs:
        spec, world, engine = build(run)
        engine.load(Path(folder) / run.name)
        results[run.name] = train(engine, spec, rank, range(SAVE_AT, SAVE_AT + REPLAY), tokens)
        world.barrier()
    return results


# ---- fixtures: one spawn each ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine-checkpoints")


@pytest.fixture(scope="module")
def curves(checkpoints) -> list[dict[str, dict]]:
    """Per rank: run name -> {loss, grad_norm, lr} over STEPS steps."""
    return run_on_ranks(train_and_save, WORLD_SIZE, [*DENSE.values(), *MOE.values()], str(checkpoints))


@pytest.fixture(scope="module")
def resumed(curves, checkpoints) -> list[dict[str, dict]]:
    runs = [{**DENSE, **MOE}[name] for name in RESUMED]
    return run_on_ranks(load_and_replay, WORLD_SIZE, runs, str(checkpoints))


def per_rank(curves: list[dict[str, dict]], name: str, key: str = "loss") -> torch.Tensor:
    return torch.tensor([rank_result[name][key] for rank_result in curves], dtype=torch.float64)


def assert_same_training(curves: list[dict[str, dict]], name: str, reference: str) -> None:
    """Same loss and grad norm (the norm before clipping; clipping is on) at every step on every rank."""
    for key, rtol in (("loss", LOSS_RTOL), ("grad_norm", NORM_RTOL), ("lr", 0.0)):
        actual, expected = per_rank(curves, name, key), per_rank(curves, reference, key)
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=0, msg=lambda m, k=key: f"{name} {k}: {m}")


# ---- tests ----------------------------------------------------------------------------------------


def test_ddp_loss_falls_on_real_text(curves):
    losses = per_rank(curves, "ddp").mean(0)
    assert losses[-3:].mean() < losses[:3].mean() - 0.3, losses.tolist()


@pytest.mark.parametrize("name", [name for name in DENSE if name != "ddp"])
def test_engine_matches_ddp_losses_and_grad_norms(curves, name):
    assert_same_training(curves, name, "ddp")


def test_moe_expert_parallel_matches_single_rank_experts(curves):
    assert_same_training(curves, "moe-zero2-ep2", "moe-zero0-ep1")


@pytest.mark.parametrize("name", ["moe-ddp-ep1", "moe-fsdp-ep1", "moe-fairscale-ep1"])
def test_moe_torch_engines_match_deepspeed(curves, name):
    assert_same_training(curves, name, "moe-zero2-ep1")
    losses = per_rank(curves, name).mean(0)
    assert losses[-3:].mean() < losses[:3].mean() - 0.3, losses.tolist()


@pytest.mark.parametrize("name", RESUMED)
def test_resume_replays_bitwise(curves, resumed, name):
    for key in ("loss", "grad_norm", "lr"):
        expected = per_rank(curves, name, key)[:, SAVE_AT : SAVE_AT + REPLAY]
        assert torch.equal(per_rank(resumed, name, key), expected), (key, per_rank(resumed, name, key), expected)


# ---- refusals that need no process group -----------------------------------------------------------

CPU_WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


def test_deepspeed_fp16_on_cpu_is_a_user_error():
    spec = job_spec(Run("fp16", {"kind": "deepspeed", "precision": "fp16"}))
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        build_engine(spec, build_model(spec.model), CPU_WORLD)


def test_fairscale_fsdp_without_cuda_is_a_user_error():
    raw = spec_dict(Run("fs", {"kind": "fairscale", "mode": "fsdp"}))
    spec = JobSpec.from_dict({**raw, "cluster": {**raw["cluster"], "device": "auto"}})  # the spec refuses cpu itself
    with pytest.raises(UserError, match="asserts CUDA"):
        build_engine(spec, build_model(spec.model), CPU_WORLD)


# ---- deepspeed_config is a pure function of the spec ----------------------------------------------


def test_deepspeed_config_follows_the_spec():
    engine = {
        "kind": "deepspeed",
        "zero_stage": 3,
        "precision": "bf16",
        "offload_optimizer": "cpu",
        "offload_param": "nvme",
        "nvme_path": "/scratch",
    }
    spec = job_spec(Run("cfg", engine, grad_clip=None))
    config = deepspeed_config(spec)
    assert config["train_micro_batch_size_per_gpu"] == MICRO_BATCH
    assert config["gradient_accumulation_steps"] == ACCUMULATION
    assert config["train_batch_size"] == GLOBAL_BATCH
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert config["zero_optimization"]["offload_param"] == {"device": "nvme", "nvme_path": "/scratch"}
    assert config["bf16"] == {"enabled": True}
    assert config["fp16"] == {"enabled": False}
    assert config["gradient_clipping"] == 0.0
    config["zero_optimization"]["stage"] = 0  # a caller editing its config must not reach the next caller's
    assert deepspeed_config(spec)["zero_optimization"]["stage"] == 3


def test_deepspeed_config_overrides_merge_last_and_deep():
    overrides = {"zero_optimization": {"reduce_bucket_size": 123}, "prescale_gradients": True, "new_key": {"a": 1}}
    spec = job_spec(Run("cfg", {"kind": "deepspeed", "zero_stage": 1, "config_overrides": overrides}))
    config = deepspeed_config(spec)
    assert config["zero_optimization"]["reduce_bucket_size"] == 123
    assert config["zero_optimization"]["stage"] == 1  # siblings of an overridden key survive
    assert config["prescale_gradients"] is True
    assert config["new_key"] == {"a": 1}
    assert "offload_optimizer" not in config["zero_optimization"]
    assert spec.engine.config_overrides == overrides  # the spec is not mutated
