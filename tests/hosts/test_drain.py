"""A spot reclaim of a worker host: SIGTERM to its `ember up --block` drains the node, the job checkpoints at a
step boundary, the host's Ray goes away, and the job resumes from that checkpoint on a fresh host."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import shard_overrides
from tests.helpers.runs import events
from tests.hosts.conftest import REPO, RayHosts
from tests.hosts.test_cluster import committed, follow_from_laptop, submit_from_laptop

pytestmark = pytest.mark.hosts
PAUSE_STEP, STEPS = 10, 30
POLL_S = 2.0  # ember.train.preemption.DRAIN_POLL_S: the loop asks the GCS at most this often

# Run on the head: wait until the GCS has marked the node at sys.argv[2] dead (at once after `ember down` there;
# a host that dies without it is found by the health checks, ~30 s: test_cluster.py's lost host).
WAIT_NODE_DEAD = """
import sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
while any(n["Alive"] and n["NodeManagerAddress"] == sys.argv[2] for n in ray.nodes()):
    time.sleep(0.5)
"""


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.1)


def join_blocking(ray_hosts: RayHosts, name: str, fault: str) -> tuple[subprocess.Popen, list[str]]:
    """A spot host: `ember up --join ... --block` in the foreground (the process a scheduler signals), with the
    pause hook in its Ray's environment (the training rank it hosts inherits it)."""
    host = ray_hosts.hosts.add_host(name)
    host.outside("/tmp/auth_token").write_text(ray_hosts.token)
    argv = [sys.executable, "-m", "ember.cli", "up", "--join", ray_hosts.gcs, "--num-cpus", "1", "--token-file",
            "/tmp/auth_token", "--block", "--grace", "120"]
    process = host.popen(argv, env={"EMBER_FAULT": fault}, cwd=str(REPO), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    while not any(line.startswith("blocking") for line in lines):
        line = process.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    ray_hosts.workers.append(host)
    return process, lines


def test_sigterm_to_a_worker_hosts_ember_up_checkpoints_the_job_and_it_resumes_on_a_fresh_host(
        ray_hosts: RayHosts, shared_shards) -> None:
    hosts, shared = ray_hosts.hosts, ray_hosts.hosts.shared_dir
    lost = ray_hosts.workers.pop()  # retired the way a person retires a host: its Ray leaves the cluster at once
    retired = ray_hosts.ember(lost, "down")
    assert retired.returncode == 0, retired.stdout + retired.stderr
    hosts.remove_host(lost.name)  # the head's one CPU and the spot host's: one rank on each
    marker = shared / "drain-pause"
    spot, said = join_blocking(ray_hosts, "spot", f"step_end:*:{PAUSE_STEP}:pause@{marker}")
    head = hosts.hosts["host1"]
    gone = head.run([sys.executable, "-c", WAIT_NODE_DEAD, ray_hosts.gcs, lost.ip], env={"RAY_AUTH_MODE": "token"},
                    timeout=180)
    assert gone.returncode == 0, gone.stderr[-3000:]
    run_dir = shared / "runs/drained"
    sets = [f"run_dir={run_dir}", *shard_overrides(shared_shards), "logging.sample_tokens=0", f"schedule.steps={STEPS}",
            "schedule.eval_every=1000", "checkpoint.every_n_steps=20", "cluster.max_failures=3"]
    submitted = submit_from_laptop(ray_hosts, "--shared", str(shared), *[p for s in sets for p in ("--set", s)])
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = submitted.stdout.split("submitted ")[1].split()[0]

    wait_for(lambda: marker.with_name(marker.name + ".paused").exists(), f"the rank paused at step {PAUSE_STEP}")
    spot.send_signal(signal.SIGTERM)  # the spot reclaim
    while not any("draining node" in line for line in said):
        line = spot.stdout.readline()
        assert line, "".join(said)
        said.append(line)
    time.sleep(POLL_S + 0.5)  # not a race: past one poll interval, the loop's next step boundary asks the GCS
    marker.with_name(marker.name + ".go").touch()
    said.append(spot.communicate(timeout=180)[0])
    assert spot.returncode == 0, "".join(said)
    spot_host = ray_hosts.workers.pop()
    assert not [pid for pid in spot_host.pids() if "raylet" in " ".join(_cmdline(pid))], "".join(said)

    stopped = [e for e in events(run_dir) if e["kind"] == "preempted"]
    assert [e["reason"] for e in stopped] == ["node draining"], stopped
    assert stopped[0]["step"] in (PAUSE_STEP, PAUSE_STEP + 1)  # the paused rank's step, or the other rank's next
    assert stopped[0]["step"] in committed(run_dir)

    ray_hosts.join(hosts.add_host("fresh"))
    logs, status = follow_from_laptop(ray_hosts, job)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "a node of the job is draining" in logs, logs[-4000:]
    resumes = [e for e in events(run_dir) if e["kind"] == "resume"]
    assert resumes and resumes[0]["step"] == stopped[0]["step"], resumes
    assert committed(run_dir)[-1] == STEPS


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline") as file:
            return file.read().split("\0")
    except OSError:
        return []
