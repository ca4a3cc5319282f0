"""launchers/slurm/ember.sbatch on a real two-host Slurm (tests/hosts/slurm.py: slurmctld on slurm1, slurmd on
slurm1 and slurm2, proctrack/cgroup): `sbatch --nodes=2` trains an EP=2 MoE with one rank per host and Ray on both;
Slurm's USR1 becomes a checkpoint and exit 75, the script requeues its own job, the requeued job resumes from that
checkpoint and completes, and no Ray or ember process is left on a host.

The USR1 lands while rank 0 is paused at the end of step PAUSE_STEP (EMBER_FAULT, checkpoint/fault.py, reaching the
workers through sbatch, srun and each host's Ray), so the run stops exactly there on any machine; the pause fires
once, not in the requeued job."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import shard_overrides
from tests.helpers.runs import events
from tests.hosts.conftest import unavailable
from tests.hosts.harness import HostCluster
from tests.hosts.slurm import SlurmOnHosts, SlurmUnavailable, check_slurm_installed, wait_for

pytestmark = pytest.mark.hosts
REPO = Path(__file__).resolve().parents[2]
STEPS, PAUSE_STEP = 20, 10


@pytest.fixture(scope="module")
def slurm(host_cluster: HostCluster) -> Iterator[SlurmOnHosts]:
    try:
        check_slurm_installed()
    except SlurmUnavailable as reason:
        unavailable("the two-host Slurm", reason)
    # hosts of its own on the session's bridge: other tests of the tier kill and restart host1/host2
    names = ["slurm1", "slurm2"]
    slurm = SlurmOnHosts(host_cluster.root / "slurm", [host_cluster.add_host(name) for name in names])
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
        for name in names:
            host_cluster.remove_host(name)


def ember_processes(slurm: SlurmOnHosts) -> list[str]:
    """Command lines of anything Ray or ember still running on either host (the daemons excepted)."""
    return [f"{host.name}: {line}" for host in slurm.hosts for line in host.command_lines()
            if "ray" in line or "ember" in line]


def test_two_host_sbatch_trains_ep2_is_preempted_requeues_itself_resumes_and_leaves_nothing(
    host_cluster: HostCluster, slurm: SlurmOnHosts, text_shards: Path
) -> None:
    shards = host_cluster.shared_dir / "slurm-shards"  # on the shared folder: each host's /tmp is its own
    shutil.copytree(text_shards, shards)
    run_dir, log = host_cluster.shared_dir / "slurm-run", host_cluster.shared_dir / "slurm-job.log"
    marker = host_cluster.shared_dir / "slurm-pause"  # on the shared folder: rank 0 may run on either host
    sets = [f"run_dir={run_dir}", *shard_overrides(shards), f"schedule.steps={STEPS}", "schedule.eval_every=10000",
            "logging.sample_tokens=0", "checkpoint.every_n_steps=10000"]
    submitted = slurm.controller.run(
        ["sbatch", "--parsable", "--nodes=2", f"--output={log}", str(REPO / "launchers/slurm/ember.sbatch"),
         str(REPO / "jobs/debug/tiny-moe.yaml"), *[p for s in sets for p in ("--set", s)]],
        env={**slurm.env, "EMBER_MAX_REQUEUES": "1", "EMBER_FAULT": f"step_end:0:{PAUSE_STEP}:pause@{marker}"},
        cwd=str(REPO), check=True)
    job = submitted.stdout.strip()

    def job_log() -> str:
        return log.read_text()[-6000:] if log.exists() else "(no job log yet)"

    wait_for(lambda: Path(f"{marker}.paused").exists(), 300, f"rank 0 to pause at step {PAUSE_STEP}; log: {job_log()}")
    slurm.controller.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env, check=True)
    wait_for(lambda: (run_dir / "PREEMPT").exists(), 60, f"ember run to take the USR1; log: {job_log()}")
    Path(f"{marker}.go").touch()
    wait_for(lambda: slurm.job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 400,
             "the requeued job to finish")
    assert slurm.job_field(job, "JobState") == "COMPLETED", job_log()
    assert slurm.job_field(job, "Restarts") == "1", job_log()
    assert "checkpointed and stopped (exit 75): requeue 1 of 1" in log.read_text()

    run = events(run_dir)
    stopped = next(e for e in run if e["kind"] == "preempted")
    assert any(e["kind"] == "checkpoint" and e["step"] == stopped["step"] for e in run)
    resumed = next(e for e in run if e["kind"] == "resume")
    assert resumed["step"] == stopped["step"] == PAUSE_STEP
    assert max(e["step"] for e in run if e["kind"] == "step") == STEPS
    manifest = json.loads(sorted((run_dir / "checkpoints").glob("step_*/manifest.json"))[-1].read_text())
    assert sorted(rank["host"] for rank in manifest["placement"]["ranks"]) == ["slurm1", "slurm2"]  # a rank per host
    wait_for(lambda: not ember_processes(slurm), 60, "Ray and ember to be gone from both hosts")
