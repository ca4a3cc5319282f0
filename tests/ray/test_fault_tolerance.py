"""Real faults on a real local Ray: kill -9 of a worker, SIGTERM to the driver, Ctrl-C. Resumes are bitwise exact."""

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
from safetensors.torch import load_file

from ember.errors import RESUMABLE_EXIT_CODE
from tests.conftest import shard_overrides

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
STEPS = 24


@pytest.fixture(scope="module")
def shards(text_shards: Path) -> Path:
    return text_shards


def command(run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    items = [f"run_dir={run_dir}", *shard_overrides(shards), f"schedule.steps={STEPS}", "checkpoint.every_n_steps=6",
             "logging.sample_tokens=0", *overrides]
    spec = str(REPO / "jobs" / "debug" / "tiny-moe.yaml")
    return [sys.executable, "-m", "ember.cli", "run", spec, *[p for item in items for p in ("--set", item)]]


def final_weights(run_dir: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{run_dir.name}.safetensors"
    subprocess.run([sys.executable, "-m", "ember.cli", "ckpt", "export", str(run_dir), "--out", str(out)], check=True)
    return load_file(str(out))


def assert_bitwise_equal(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    different = [name for name in left if not left[name].equal(right[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    events = run_dir / "events.jsonl"
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if events.exists():
            steps = [json.loads(line).get("step", 0) for line in events.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def uninterrupted(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir = tmp_path_factory.mktemp("ft-reference") / "reference"
    subprocess.run(command(run_dir, shards), check=True, capture_output=True, timeout=600)
    return final_weights(run_dir, run_dir.parent)


def test_kill_9_of_a_worker_restarts_and_ends_bitwise_equal(shards, uninterrupted, tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(command(run_dir, shards, "cluster.max_failures=2"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, 9, process)  # past the step-6 checkpoint
        workers = [p for p in psutil.Process(process.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline())]
        assert len(workers) == 2
        os.kill(workers[1].pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "resuming from" in output
    assert_bitwise_equal(final_weights(run_dir, tmp_path), uninterrupted)


def test_sigterm_to_the_driver_checkpoints_exits_75_and_resumes_exactly(shards, uninterrupted, tmp_path) -> None:
    run_dir = tmp_path / "preempted"
    process = subprocess.Popen(command(run_dir, shards), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, 8, process)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == RESUMABLE_EXIT_CODE, output
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    preempted_at = next(e["step"] for e in events if e["kind"] == "preempted")
    assert 8 <= preempted_at < STEPS
    assert any(e["kind"] == "checkpoint" and e["step"] == preempted_at for e in events)
    resumed = subprocess.run(command(run_dir, shards), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"(step {preempted_at})" in resumed.stdout
    assert_bitwise_equal(final_weights(run_dir, tmp_path), uninterrupted)


def test_ctrl_c_checkpoints_at_the_next_step_and_exits_75(shards, tmp_path: Path) -> None:
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group (driver, Ray, workers)."""
    run_dir = tmp_path / "interrupted"
    process = subprocess.Popen(command(run_dir, shards), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        wait_for_step(run_dir, 8, process)
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == RESUMABLE_EXIT_CODE, output
    assert "Ctrl-C: checkpointing at the next step boundary" in output and "Traceback" not in output
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    stopped_at = next(e["step"] for e in events if e["kind"] == "preempted")
    assert 8 <= stopped_at < STEPS and (run_dir / "checkpoints" / f"step_{stopped_at:06d}" / "manifest.json").is_file()
