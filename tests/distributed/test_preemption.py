"""SIGTERM to one torchrun worker: every rank checkpoints at the next step boundary, exits 75, resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ember.errors import RESUMABLE_EXIT_CODE
from tests.conftest import shard_overrides
from tests.helpers.distributed import free_port
from tests.helpers.runs import events

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(text_shards: Path) -> Path:
    return text_shards


def torchrun(run_dir: Path, shards: Path) -> list[str]:
    items = [f"run_dir={run_dir}", *shard_overrides(shards), "schedule.steps=20", "checkpoint.every_n_steps=100",
             "logging.sample_tokens=0"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            "-m", "ember.train.torchrun", str(REPO / "jobs" / "debug" / "tiny-dense.yaml"),
            *[p for item in items for p in ("--set", item)]]


def export(run_dir: Path) -> dict:
    out = run_dir / "final.safetensors"
    subprocess.run([sys.executable, "-m", "ember.cli", "ckpt", "export", str(run_dir), "--out", str(out)], check=True)
    return load_file(str(out))


def test_sigterm_to_a_worker_checkpoints_at_the_boundary_and_resumes_exactly(shards: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(torchrun(reference, shards), check=True, capture_output=True, env=env, timeout=300)

    run_dir = tmp_path / "preempted"
    # Rank 1 gets SIGTERM at the end of step 5 (a named point, not a race with ~25 ms steps); rank 0 learns
    # of it at that boundary.
    faulted = {**env, "EMBER_FAULT": "step_end:1:5:term"}
    launcher = subprocess.run(torchrun(run_dir, shards), capture_output=True, text=True, env=faulted, timeout=300)
    assert launcher.returncode != 0
    assert f"exitcode  : {RESUMABLE_EXIT_CODE}" in launcher.stdout + launcher.stderr  # torchrun's failure report
    stopped = [e for e in events(run_dir) if e["kind"] == "preempted"]
    assert [e["step"] for e in stopped] == [5]
    assert any(e["kind"] == "checkpoint" and e["step"] == 5 for e in events(run_dir))

    resumed = subprocess.run(torchrun(run_dir, shards), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert any(e["kind"] == "resume" and e["step"] == 5 for e in events(run_dir))
    final, expected = export(run_dir), export(reference)
    assert all(final[name].equal(expected[name]) for name in expected)
