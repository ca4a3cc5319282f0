"""Two Ray nodes on one machine (`ember up` + `ember up --join`, one CPU each): an EP=2 job spans both;
losing the worker node mid-run makes the job wait, then resume from the newest committed checkpoint once
a node joins again."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import shard_overrides
from tests.helpers.cli import ember as ember_cli
from tests.helpers.distributed import free_port
from tests.helpers.runs import events

pytestmark = pytest.mark.ray
ember = functools.partial(ember_cli, check=True)  # every step of this scenario must succeed
REPO = Path(__file__).resolve().parents[2]
# A tiny-moe step takes ~25 ms: the job must outlast the ~3 s from its first commit to the node being gone
# (with 36 steps it did not: the job had finished and the kill only hit its shutdown).
STEPS = 400


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def test_expert_parallel_job_spans_two_nodes_and_survives_losing_one(tmp_path: Path, text_shards: Path) -> None:
    env = {**os.environ, "EMBER_HOME": str(tmp_path / "home"), "RAY_USAGE_STATS_ENABLED": "0"}
    port, gcs = free_port(), free_port()
    head, node = f"h{os.getpid()}", f"w{os.getpid()}"
    run_dir = tmp_path / "run"
    ember("up", "--name", head, "--port", str(port), "--gcs-port", str(gcs), "--num-cpus", "1", env=env)
    try:
        ember("up", "--name", node, "--join", f"127.0.0.1:{gcs}", "--num-cpus", "1", env=env)
        sets = [f"run_dir={run_dir}", *shard_overrides(text_shards), f"schedule.steps={STEPS}",
                "checkpoint.every_n_steps=10", "cluster.max_failures=3", "logging.sample_tokens=0"]
        submitted = ember("submit", str(REPO / "jobs/debug/tiny-moe.yaml"), "--address", f"http://127.0.0.1:{port}",
                          *[p for s in sets for p in ("--set", s)], env=env)
        job = submitted.stdout.split("submitted ")[1].split()[0]

        def status(job: str) -> str:
            return ember("status", job, "--address", f"http://127.0.0.1:{port}", env=env).stdout.strip()

        def logs(job: str) -> str:  # the job's own output, shown when an assertion about it fails
            return ember("logs", job, "--address", f"http://127.0.0.1:{port}", env=env).stdout[-6000:]

        def committed() -> list[Path]:  # the manifest is written last: its presence is the commit
            return sorted((run_dir / "checkpoints").glob("step_*/manifest.json"))

        wait_for(committed, 300, "the first committed checkpoint", poll=0.2)
        latest = committed()[-1]
        manifest = json.loads(latest.read_text())
        assert len({rank["node_id"] for rank in manifest["placement"]["ranks"]}) == 2  # EP ranks on both nodes
        assert manifest["placement"]["layers"]["1"] == {"0": 0, "1": 0, "2": 1, "3": 1}  # expert -> EP rank
        engine_dir = latest.parent / "engine"
        assert len(list(engine_dir.glob("layer_0_expert_*_mp_rank_00_model_states.pt"))) == 4  # one file per expert

        ember("down", "--name", node, env=env)  # the worker node's processes are gone
        before = len(events(run_dir))
        time.sleep(5)
        assert status(job) == "RUNNING", logs(job)
        ember("up", "--name", node, "--join", f"127.0.0.1:{gcs}", "--num-cpus", "1", env=env)

        wait_for(lambda: status(job) in ("SUCCEEDED", "FAILED", "STOPPED"), 400, "the job to finish")
        assert status(job) == "SUCCEEDED", logs(job)
        resumes = [e for e in events(run_dir)[before:] if e["kind"] == "resume"]
        assert resumes, resumes
        assert resumes[0]["step"] % 10 == 0, resumes
        assert 10 <= resumes[0]["step"] < STEPS, resumes
        assert (run_dir / "checkpoints" / f"step_{STEPS:06d}" / "manifest.json").is_file()
    finally:
        subprocess.run([sys.executable, "-m", "ember.cli", "down", "--name", node], env=env, capture_output=True)
        subprocess.run([sys.executable, "-m", "ember.cli", "down", "--name", head], env=env, capture_output=True)
