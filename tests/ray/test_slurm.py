"""The Slurm recipe on a real single-node Slurm (.ci/slurm.sh starts it): a job runs, SIGUSR1 from
`scancel --signal=USR1 --batch` becomes a preemption checkpoint and exit 75, and no Ray is left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ember.errors import RESUMABLE_EXIT_CODE
from tests.conftest import shard_overrides

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def slurm_is_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm(text_shards: Path) -> Path:
    if not slurm_is_up():
        if os.environ.get("CI"):
            pytest.fail("CI must start Slurm first: eval \"$(bash .ci/slurm.sh start)\"")
        pytest.skip("no Slurm here: start one with `eval \"$(bash .ci/slurm.sh start)\"`")
    return text_shards


def sbatch(run_dir: Path, shards: Path, steps: int) -> subprocess.Popen:
    sets = [f"run_dir={run_dir}", *shard_overrides(shards), f"schedule.steps={steps}", "logging.sample_tokens=0",
            "checkpoint.every_n_steps=1000"]
    command = ["sbatch", "--wait", "--nodes=1", f"--cpus-per-task={os.cpu_count()}", "--parsable",
               f"--output={run_dir.parent / (run_dir.name + '.log')}", str(REPO / "launchers/slurm/ember.sbatch"),
               str(REPO / "jobs/debug/tiny-dense.yaml"), *[p for s in sets for p in ("--set", s)]]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)


def ray_left_behind(job_id: str) -> list[str]:
    listing = subprocess.run(["ps", "axww"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in listing if f"ember-slurm-{job_id}/" in line or f"ember-slurm-{job_id} " in line]


def test_sbatch_runs_the_job_and_usr1_before_the_time_limit_checkpoints_exits_75_and_stops_its_ray(
    slurm: Path, tmp_path: Path
) -> None:
    """One sbatch (a launch costs ~80 s here, so one test): the script starts a Ray head, `ember run` trains
    on it, Slurm's USR1 becomes a checkpoint at the next step and exit 75, and the job's Ray is gone."""
    run_dir = tmp_path / "run"
    job = sbatch(run_dir, slurm, steps=2000)
    job_id = job.stdout.readline().strip()
    deadline = time.monotonic() + 300
    while not (run_dir / "events.jsonl").exists() or '"kind": "step"' not in (run_dir / "events.jsonl").read_text():
        assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    assert job.wait(timeout=300) == RESUMABLE_EXIT_CODE, (tmp_path / "run.log").read_text()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    stopped = next(e for e in events if e["kind"] == "preempted")
    assert any(e["kind"] == "checkpoint" and e["step"] == stopped["step"] for e in events)
    assert ray_left_behind(job_id) == []
