"""SIGTERM to one torchrun worker: every rank checkpoints at the next step boundary, exits 75, resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
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
    launcher = subprocess.Popen(torchrun(run_dir, shards), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not any(e["kind"] == "step" and e["step"] >= 5 for e in events(run_dir)):
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                   if "ember.train.torchrun" in p.cmdline()]
        assert len(workers) == 2
        os.kill(workers[1].pid, signal.SIGTERM)  # rank 1 only; rank 0 learns of it at the boundary
        launcher.wait(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    assert f"exitcode  : {RESUMABLE_EXIT_CODE}" in launcher.stdout.read().decode()  # torchrun's failure report
    stopped = [e for e in events(run_dir) if e["kind"] == "preempted"]
    assert len(stopped) == 1 and 5 <= stopped[0]["step"] < 20
    assert any(e["kind"] == "checkpoint" and e["step"] == stopped[0]["step"] for e in events(run_dir))

    resumed = subprocess.run(torchrun(run_dir, shards), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert any(e["kind"] == "resume" and e["step"] == stopped[0]["step"] for e in events(run_dir))
    final, expected = export(run_dir), export(reference)
    assert all(final[name].equal(expected[name]) for name in expected)
