"""ember across hosts with their own addresses and disks: a head bound to host1's IP, host2 joining with
the head's token, and jobs submitted from a laptop that shares no storage with the cluster."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import shard_overrides
from tests.helpers.runs import assert_bitwise_equal, events, final_weights
from tests.hosts.conftest import (
    EVERY,
    STEPS,
    RayHosts,
    follow_from_laptop,
    shards_over_http,
    submit_from_laptop,
    submit_job,
    wait_for,
)

pytestmark = pytest.mark.hosts

# Run on host1 with the token: every alive node's IP, and the hostname a task pinned to host2's node sees.
WHERE_TASKS_RUN = """
import socket, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], log_to_driver=False)
nodes = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
print(" ".join(sorted(nodes)))
pinned = NodeAffinitySchedulingStrategy(nodes[sys.argv[2]], soft=False)
hostname = ray.remote(num_cpus=0)(lambda: socket.gethostname())
print(ray.get(hostname.options(scheduling_strategy=pinned).remote()))
"""


def test_a_worker_host_joins_the_head_at_its_own_ip_with_the_token(ray_hosts: RayHosts) -> None:
    host1, host2 = ray_hosts.hosts.hosts["host1"], ray_hosts.hosts.hosts["host2"]
    assert f"ember up --join {host1.ip}:6379 --token-file auth_token" in ray_hosts.head_output  # how to join
    seen = host1.run([sys.executable, "-c", WHERE_TASKS_RUN, ray_hosts.gcs, host2.ip], env={"RAY_AUTH_MODE": "token"},
                     timeout=120)
    assert seen.returncode == 0, seen.stderr[-3000:]
    ips, hostname = seen.stdout.split("\n")[:2]
    assert ips.split() == sorted([host1.ip, host2.ip])
    assert hostname == "host2"


def test_a_host_without_the_token_is_refused(ray_hosts: RayHosts) -> None:
    laptop = ray_hosts.hosts.hosts["laptop"]
    refused = ray_hosts.ember(laptop, "up", "--join", ray_hosts.gcs, "--num-cpus", "1")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "--token-file" in refused.stderr, refused.stderr
    assert not laptop.outside(f"{laptop.home}/.ray/auth_token").exists()  # no token was made up


def test_submit_from_a_laptop_refuses_paths_the_cluster_cannot_see(ray_hosts: RayHosts) -> None:
    refused = submit_from_laptop(ray_hosts)  # the spec's own shards and the default run_dir: this laptop's
    assert refused.returncode == 2, refused.stdout + refused.stderr
    for field in ("run_dir: not set", "data.train.urls:", "data.val.urls:", "data.build.out:", "--shared"):
        assert field in refused.stderr, refused.stderr


def test_a_run_dir_that_is_not_shared_storage_fails_fast(ray_hosts: RayHosts, shared_shards) -> None:
    # /tmp exists on every host but is each host's own: declared shared, it is the probe that catches it
    sets = ["run_dir=/tmp/not-shared/run", *shard_overrides(shared_shards)]
    started = time.monotonic()
    shared = ["--shared", str(ray_hosts.hosts.shared_dir), "--shared", "/tmp/not-shared"]
    submitted = submit_from_laptop(ray_hosts, *shared, *[p for s in sets for p in ("--set", s)])
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    logs, status = follow_from_laptop(ray_hosts, submitted.stdout.split("submitted ")[1].split()[0])
    assert status == "FAILED", logs[-4000:]
    assert "run_dir /tmp/not-shared/run is not the same storage on every host" in logs, logs[-4000:]
    assert time.monotonic() - started < 90


def committed(run_dir: Path) -> list[int]:
    """Steps of committed checkpoints: the manifest is written last, its presence is the commit."""
    return sorted(int(path.parent.name.split("_")[1]) for path in run_dir.glob("checkpoints/step_*/manifest.json"))


@pytest.fixture(scope="module")
def uninterrupted(ray_hosts: RayHosts, shared_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Final weights of the job run without a fault, one EP rank on each host."""
    run_dir = ray_hosts.hosts.shared_dir / "runs/uninterrupted"
    logs, status = follow_from_laptop(ray_hosts, submit_job(ray_hosts, run_dir, shared_shards))
    assert status == "SUCCEEDED", logs[-4000:]
    return final_weights(run_dir, tmp_path_factory.mktemp("uninterrupted"))


def resumed_steps(run_dir: Path) -> list[int]:
    return [event["step"] for event in events(run_dir) if event["kind"] == "resume"]


def test_a_laptop_job_reading_shards_over_http_survives_losing_a_whole_host(ray_hosts: RayHosts, text_shards: Path,
                                                                          uninterrupted, tmp_path) -> None:
    """Submitted from the laptop, run_dir on the shared folder, ember's own shards served by a plain HTTP server
    inside host1 from host1's private /tmp (no other host sees them: every rank reads over the network). While
    host2's rank is paused at the end of step 25 (step 20 committed), every process of host2 dies at once; a fresh
    host joins with the token, the job resumes from step 20 (the data cursor pins the shards by the sha256 in the
    served shards.json) and ends with the uninterrupted run's weights, bit for bit. The logs stream to the
    laptop. (A SIGKILL of one rank that Ray restarts on the same hosts is in
    tests/ray/cluster/test_fault_tolerance.py.)"""
    hosts, run_dir = ray_hosts.hosts, ray_hosts.hosts.shared_dir / "runs/from-laptop"
    host1, host2 = hosts.hosts["host1"], ray_hosts.workers[-1]
    with shards_over_http(host1, text_shards) as (url, requests):
        paused = ray_hosts.arm_pause(host2)
        job = submit_job(ray_hosts, run_dir, url)
        wait_for(paused)
        first = json.loads(wait_for(run_dir / "checkpoints" / f"step_{EVERY:06d}" / "manifest.json").read_text())
        ray_hosts.workers.remove(host2)
        hosts.remove_host(host2.name)  # SIGKILL to every process of the host at once, then its network is gone
        host3 = hosts.add_host("host3")
        ray_hosts.join(host3)
        logs, status = follow_from_laptop(ray_hosts, job)
        served = requests.read_text().splitlines()

    assert status == "SUCCEEDED", logs[-4000:]
    assert f"done: {run_dir}" in logs  # streamed to the laptop
    assert set(resumed_steps(run_dir)) == {EVERY}, events(run_dir)
    assert committed(run_dir)[-1] == STEPS
    # Everything survives: weights, optimizer state, RNG and the data cursor are in the checkpoint
    assert_bitwise_equal(final_weights(run_dir, tmp_path), uninterrupted)
    # every host that ran a rank read the shards from host1, the fresh one too; and the shards' sha256s. Searched
    # within each line: host2's death mid-transfer makes the server print a traceback without a final newline
    readers = {match[1] for line in served if (match := re.search(r'(\d+\.\d+\.\d+\.\d+) - - \[.*"GET /train-', line))}
    assert readers == {host1.ip, host2.ip, host3.ip}
    assert any('"GET /shards.json ' in line for line in served)
    # the EP=2 job had one rank on each host, and the manifest says which host holds which experts
    assert sorted(rank["host"] for rank in first["placement"]["ranks"]) == ["host1", "host2"]
    assert first["placement"]["layers"]["1"] == {"0": 0, "1": 0, "2": 1, "3": 1}  # expert -> EP rank
