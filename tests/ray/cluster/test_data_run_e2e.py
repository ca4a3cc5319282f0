"""`ember run` on image shards on this package's `ember up` cluster: a tiny image-token GPT trains past a truncated
shard under data.on_error=skip (the count reaches TensorBoard), and under `raise` the run exits 2 naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ember.data.build_images import build_image_shards
from ember.observe.tensorboard import read_scalars
from tests.ray.cluster.conftest import ON_CLUSTER, EmberCluster

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[3]
SPEC = REPO / "jobs" / "debug" / "tiny-image-gpt.yaml"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digit shards (6 train shards of 256) plus a copy of one cut short after a few samples."""
    out = tmp_path_factory.mktemp("e2e-digits") / "digits"
    build_image_shards(out, "digits", shard_size=256)
    whole = (out / "train-000005.tar").read_bytes()
    (out / "truncated-000005.tar").write_bytes(whole[: 20 * 1024 + 300])  # ~10 samples, then mid-member
    return out


def ember_run(cluster: EmberCluster, run_dir: Path, digits: Path, on_error: str) -> subprocess.CompletedProcess:
    urls = [str(digits / f"train-{i:06d}.tar") for i in range(5)] + [str(digits / "truncated-000005.tar")]
    overrides = [
        f"run_dir={run_dir}",
        f"data.train.urls=[{', '.join(urls)}]",
        f"data.val.urls={digits}/val-000000.tar",
        "data.build=null",
        f"data.on_error={on_error}",
        ON_CLUSTER,
    ]
    args = [sys.executable, "-m", "ember.cli", "run", str(SPEC)] + [p for o in overrides for p in ("--set", o)]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=cluster.run_env())


def test_image_gpt_trains_past_a_truncated_shard_and_logs_the_skip(tmp_path: Path, digits: Path,
                                                                   ember_cluster: EmberCluster) -> None:
    run = ember_run(ember_cluster, tmp_path / "run", digits, "skip")
    assert run.returncode == 0, run.stdout + run.stderr
    board = tmp_path / "run" / "tensorboard"
    losses = [value for _, value in read_scalars(board, "train/loss")]
    assert len(losses) == 20  # it learns the digits
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    skipped = read_scalars(board, "data/skipped")
    assert skipped  # once per pass of its slot over the cut shard
    assert skipped[-1][1] >= 1


def test_a_truncated_shard_under_raise_exits_2_naming_it(tmp_path: Path, digits: Path,
                                                         ember_cluster: EmberCluster) -> None:
    run = ember_run(ember_cluster, tmp_path / "run", digits, "raise")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "truncated-000005.tar" in run.stderr
    assert "data.on_error=skip" in run.stderr
    assert "Traceback" not in run.stderr
