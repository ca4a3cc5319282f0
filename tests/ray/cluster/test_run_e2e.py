"""`ember run` end to end on this package's `ember up` cluster (cluster.address=auto): train, log, checkpoint,
resume, export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ember.checkpoint.export import load_exported
from ember.checkpoint.manager import CheckpointManager
from ember.checkpoint.manifest import verify_manifest
from ember.data.stream import ShardStream
from ember.observe.tensorboard import read_scalars
from ember.train.objectives.lm import split_batch
from ember.world import local_world
from tests.conftest import shard_overrides
from tests.ray.cluster.conftest import ON_CLUSTER, EmberCluster

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def shards(text_shards: Path) -> Path:
    return text_shards


def ember_run(cluster: EmberCluster, spec: str, run_dir: Path, shards: Path,
              *overrides: str) -> subprocess.CompletedProcess:
    items = [f"run_dir={run_dir}", *shard_overrides(shards), ON_CLUSTER, *overrides]
    args = [sys.executable, "-m", "ember.cli", "run", str(REPO / spec), *[p for item in items for p in ("--set", item)]]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=cluster.run_env())


def test_moe_run_logs_checkpoints_resumes_and_exports(tmp_path: Path, shards: Path,
                                                      ember_cluster: EmberCluster) -> None:
    run_dir = tmp_path / "run"
    first = ember_run(ember_cluster, "jobs/debug/tiny-moe.yaml", run_dir, shards)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "held-out loss" in first.stdout
    assert "sample after 30 steps" in first.stdout

    losses = [value for _, value in read_scalars(run_dir / "tensorboard", "train/loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # it learns
    assert read_scalars(run_dir / "tensorboard", "train/aux_loss")
    for phase in ("data_s", "forward_backward_s", "optimizer_s", "checkpoint_s", "peak_memory_gb"):
        assert [step for step, _ in read_scalars(run_dir / "tensorboard", f"time/{phase}")] == list(range(5, 31, 5))
    assert sum(value for _, value in read_scalars(run_dir / "tensorboard", "time/forward_backward_s")) > 0
    assert "ms/step [data " in first.stdout
    checkpoints = CheckpointManager(run_dir / "checkpoints", world=None).committed()
    assert [c.name for c in checkpoints] == ["step_000030", "step_000015"]
    assert verify_manifest(checkpoints[0]) == []

    second = ember_run(ember_cluster, "jobs/debug/tiny-moe.yaml", run_dir, shards, "schedule.steps=40")
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming from {run_dir / 'checkpoints' / 'step_000030'} (step 30)" in second.stdout
    steps = [step for step, _ in read_scalars(run_dir / "tensorboard", "train/loss")]
    assert sorted(steps) == list(range(1, 41))  # 31..40 continue, nothing repeated

    exported = tmp_path / "model.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", "ckpt", "export", str(run_dir), "--out", str(exported)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert_export_reproduces_held_out_loss(exported, shards, run_dir)


def assert_export_reproduces_held_out_loss(exported: Path, shards: Path, run_dir: Path) -> None:
    """The EP=2 DeepSpeed model's last held-out loss, recomputed by the plain single-process model."""
    from ember.engines.expert_groups import attach_expert_groups

    world = local_world()
    model, spec = load_exported(exported)
    attach_expert_groups(model, world)
    model.eval()
    stream = ShardStream(
        [str(shards / "val-000000.tar")],
        seq_len=spec.model.seq_len,
        micro_batch=spec.schedule.micro_batch,
        rank=0,
        world_size=1,
        num_slots=spec.data.num_slots,
        seed=spec.data.seed,
    )
    batches = iter(stream)
    losses = []
    with torch.no_grad():
        for _ in range(spec.schedule.eval_batches):
            inputs, targets = split_batch(next(batches))
            logits = model(inputs).logits
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item())
    logged = read_scalars(run_dir / "tensorboard", "val/loss")[-1]
    assert logged[0] == 40
    assert sum(losses) / len(losses) == pytest.approx(logged[1], rel=1e-5)
