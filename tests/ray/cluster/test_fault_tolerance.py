"""Real faults on a real local Ray: kill -9 of a worker, SIGTERM to the driver, Ctrl-C. Resumes are bitwise exact.

The uninterrupted reference and the resume after SIGTERM run on this package's `ember up` cluster; the faulted
runs start their own embedded Ray, as `ember run` does by default: SIGTERM and Ctrl-C test the driver's handling
of its own Ray and workers, and the worker that kills itself reads EMBER_FAULT from the environment it inherits
from the driver (a cluster's workers inherit their raylet's).

Faults happen at named steps (EMBER_FAULT, checkpoint/fault.py): a worker kills itself at a step's end, or
pauses there while the test signals the driver, so no test races the ~25 ms steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ember.errors import RESUMABLE_EXIT_CODE
from tests.conftest import shard_overrides
from tests.helpers.runs import assert_bitwise_equal, final_weights
from tests.ray.cluster.conftest import ON_CLUSTER, EmberCluster

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[3]
STEPS = 24


@pytest.fixture(scope="module")
def shards(text_shards: Path) -> Path:
    return text_shards


def command(run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    items = [f"run_dir={run_dir}", *shard_overrides(shards), f"schedule.steps={STEPS}", "checkpoint.every_n_steps=6",
             "logging.sample_tokens=0", *overrides]
    spec = str(REPO / "jobs" / "debug" / "tiny-moe.yaml")
    return [sys.executable, "-m", "ember.cli", "run", spec, *[p for item in items for p in ("--set", item)]]


def with_fault(fault: str) -> dict[str, str]:
    return {**os.environ, "EMBER_FAULT": fault}


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def signal_while_paused(run_dir: Path, marker: Path, process: subprocess.Popen, send, while_paused=None) -> str:
    """Rank 0 is paused at the end of step 8: signal the driver, wait for its request, then let rank 0 go."""
    wait_for(Path(f"{marker}.paused"), process)
    if while_paused is not None:
        while_paused()
    send()
    wait_for(run_dir / "PREEMPT", process)
    Path(f"{marker}.go").touch()
    output, _ = process.communicate(timeout=300)
    return output


@pytest.fixture(scope="module")
def uninterrupted(shards: Path, tmp_path_factory: pytest.TempPathFactory, ember_cluster: EmberCluster) -> dict:
    run_dir = tmp_path_factory.mktemp("ft-reference") / "reference"
    done = subprocess.run(command(run_dir, shards, ON_CLUSTER), capture_output=True, text=True, timeout=600,
                          env=ember_cluster.run_env())
    assert done.returncode == 0, done.stdout + done.stderr
    return final_weights(run_dir, run_dir.parent)


def test_kill_9_of_a_worker_restarts_and_ends_bitwise_equal(shards, uninterrupted, tmp_path: Path) -> None:
    run_dir, fired = tmp_path / "killed", tmp_path / "fired"
    fault = with_fault(f"step_end:1:9:kill@{fired}")  # rank 1, past the step-6 checkpoint; once, not after restart
    result = subprocess.run(command(run_dir, shards, "cluster.max_failures=2"), capture_output=True, text=True,
                            env=fault, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert fired.exists()
    assert "resuming from" in output
    assert_bitwise_equal(final_weights(run_dir, tmp_path), uninterrupted)


def ray_actors_under(pid: int) -> set[str]:
    """Class names of the Ray actors among a process's descendants (Ray titles them `ray::Class.method`)."""
    names = set()
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            title = " ".join(child.cmdline())
            if title.startswith("ray::"):
                names.add(title[5:].split(".")[0].split(" ")[0])
    return names


def test_sigterm_to_the_driver_checkpoints_exits_75_and_resumes_exactly(
    shards, uninterrupted, tmp_path, ember_cluster: EmberCluster
) -> None:
    """Preempted on its embedded Ray, resumed on the `ember up` cluster: the run folder is all a resume needs."""
    run_dir, marker = tmp_path / "preempted", tmp_path / "pause"
    process = subprocess.Popen(command(run_dir, shards), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=with_fault(f"step_end:0:8:pause@{marker}"))
    actors: set[str] = set()
    try:
        output = signal_while_paused(run_dir, marker, process, lambda: process.send_signal(signal.SIGTERM),
                                     while_paused=lambda: actors.update(ray_actors_under(process.pid)))
    finally:
        process.kill()
    # The run's embedded Ray holds Ray Train's controller and workers and ember's progress queue, and none of the
    # actors of Ray Data, Ray's autoscaler requests or its preemption watcher, which ember does not use
    # (train/ray_trainer.py): each would be one more process importing ray.train while the workers start.
    assert {"TrainController", "RayTrainWorker", "_QueueActor"} <= actors, actors
    assert not actors & {"DatasetManager", "_AutoscalingCoordinatorActor", "PreemptionWatcher"}, actors
    assert process.returncode == RESUMABLE_EXIT_CODE, output
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "preempted"] == [8]
    assert any(e["kind"] == "checkpoint" and e["step"] == 8 for e in events)
    resumed = subprocess.run(command(run_dir, shards, ON_CLUSTER), capture_output=True, text=True, timeout=600,
                             env=ember_cluster.run_env())
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "(step 8)" in resumed.stdout
    assert_bitwise_equal(final_weights(run_dir, tmp_path), uninterrupted)


def test_ctrl_c_checkpoints_at_the_next_step_and_exits_75(shards, tmp_path: Path) -> None:
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group (driver, Ray, workers)."""
    run_dir, marker = tmp_path / "interrupted", tmp_path / "pause"
    process = subprocess.Popen(command(run_dir, shards), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env=with_fault(f"step_end:0:8:pause@{marker}"))
    try:
        output = signal_while_paused(run_dir, marker, process, lambda: os.killpg(process.pid, signal.SIGINT))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == RESUMABLE_EXIT_CODE, output
    assert "Ctrl-C: checkpointing at the next step boundary" in output
    assert "Traceback" not in output
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "preempted"] == [8]
    assert (run_dir / "checkpoints" / "step_000008" / "manifest.json").is_file()
