"""Namespaced hosts for the `hosts` tier: one set per session (host1 and host2 share a folder, laptop does not).

Where namespaces cannot be made (not root, no iproute2) the tier is skipped with the reason; under CI=true
it fails instead, since CI is where this tier must run."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import shard_overrides
from tests.hosts.harness import Host, HostCluster, HostsUnavailable, check_namespaces_available

REPO = Path(__file__).resolve().parents[2]
# Every worker host's rank can pause at the end of this step (EMBER_FAULT in the host's environment, which Ray's
# workers inherit); a test arms it. Jobs that checkpoint every 20 steps have then committed step 20, and only it.
PAUSE_STEP = 25
# The tiny-moe job of the resume tests: faults come while a worker host's rank is paused at the end of PAUSE_STEP,
# after the commit of step EVERY and before the next
STEPS, EVERY = 40, 20
assert EVERY < PAUSE_STEP < 2 * EVERY


def unavailable(what: str, reason: Exception) -> None:
    """Skip where `what` cannot run here; under CI=true fail instead, so CI never passes by skipping it."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run {what}: {reason}")
    pytest.skip(str(reason))


def require_namespaces() -> None:
    try:
        check_namespaces_available()
    except HostsUnavailable as reason:
        unavailable("the hosts tier", reason)


@contextlib.contextmanager
def made_hosts() -> Iterator[HostCluster]:
    """host1 and host2 (cluster hosts, shared folder) and laptop (outside the cluster); removed at the end."""
    require_namespaces()
    cluster = HostCluster.create(owner_pid=os.getpid())
    try:
        cluster.add_host("host1")
        cluster.add_host("host2")
        cluster.add_host("laptop", shared=False)
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def host_cluster() -> Iterator[HostCluster]:
    """The hosts the Ray cluster runs on (tests may lose a host and add fresh ones)."""
    with made_hosts() as cluster:
        yield cluster


@dataclass
class RayHosts:
    """A Ray cluster across namespaced hosts: head on host1 at its own IP, host2 joined with the token."""

    hosts: HostCluster
    head_output: str  # what `ember up` printed on the head
    gcs: str  # HEAD_IP:6379
    dashboard: str  # http://HEAD_IP:8265
    token: str
    workers: list[Host]  # the hosts joined to the head

    def ember(self, host: Host, *args: str, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
        """`python -m ember.cli ARGS` on `host`, from the repository's folder (the checkout on a laptop)."""
        return host.run([sys.executable, "-m", "ember.cli", *args], env=env, cwd=str(REPO), timeout=timeout)

    def join(self, host: Host) -> None:
        """Hands the head's token to `host` the way a person would (a copy of the file), then joins. The host's
        Ray starts with its pause at PAUSE_STEP disarmed (its once-file exists): `arm_pause` arms it."""
        copy = host.outside("/tmp/auth_token")
        copy.write_text(self.token)
        marker = self.pause_marker(host)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        fault = {"EMBER_FAULT": f"step_end:*:{PAUSE_STEP}:pause@{marker}"}
        joined = self.ember(host, "up", "--join", self.gcs, "--num-cpus", "1", "--token-file", "/tmp/auth_token",
                            env=fault)
        assert joined.returncode == 0, joined.stdout + joined.stderr
        self.workers.append(host)

    def pause_marker(self, host: Host) -> Path:
        return self.hosts.shared_dir / "faults" / host.name

    def arm_pause(self, host: Host) -> Path:
        """The next job's rank on `host` stops at the end of step PAUSE_STEP, writes its PID to `<marker>.paused`
        and waits (checkpoint/fault.py). It fires once: a worker started after it does not pause again."""
        marker = self.pause_marker(host)
        marker.unlink()
        return Path(f"{marker}.paused")


def wait_for(path: Path, timeout: float = 300) -> Path:
    """Waits for a file that marks a named point of a job (a pause, a commit)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout:.0f} s"
        time.sleep(0.05)
    return path


def submit_from_laptop(ray_hosts: RayHosts, *args: str):
    laptop = ray_hosts.hosts.hosts["laptop"]
    return ray_hosts.ember(laptop, "submit", "jobs/debug/tiny-moe.yaml", "--address", ray_hosts.dashboard, *args,
                           env={"RAY_AUTH_TOKEN": ray_hosts.token})


def follow_from_laptop(ray_hosts: RayHosts, job: str) -> tuple[str, str]:
    """`ember logs --follow` until the job ends, then its status: both from the laptop."""
    laptop, env = ray_hosts.hosts.hosts["laptop"], {"RAY_AUTH_TOKEN": ray_hosts.token}
    logs = ray_hosts.ember(laptop, "logs", job, "--follow", "--address", ray_hosts.dashboard, env=env, timeout=400)
    assert logs.returncode == 0, logs.stderr[-3000:]
    status = ray_hosts.ember(laptop, "status", job, "--address", ray_hosts.dashboard, env=env)
    return logs.stdout, status.stdout.strip()


def submit_job(ray_hosts: RayHosts, run_dir: Path, shards: Path | str) -> str:
    """The tiny-moe job every resume here is compared with (only run_dir and where its shards are differ),
    submitted from the laptop. The shard order depends on the shard count and seed, not on the URLs."""
    sets = [f"run_dir={run_dir}", *shard_overrides(shards), "logging.sample_tokens=0", f"schedule.steps={STEPS}",
            "schedule.eval_every=1000", f"checkpoint.every_n_steps={EVERY}", "cluster.max_failures=3"]
    shared = ["--shared", str(ray_hosts.hosts.shared_dir)]
    submitted = submit_from_laptop(ray_hosts, *shared, *[p for s in sets for p in ("--set", s)])
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    return submitted.stdout.split("submitted ")[1].split()[0]


def start_ray_hosts(hosts: HostCluster) -> RayHosts:
    """`ember up` on host1 at its own IP, host2 joined with the token; one CPU per host, so a 2-worker job puts
    one rank on each. The hosts' teardown kills every process of every host."""
    head = hosts.hosts["host1"]
    started = head.run([sys.executable, "-m", "ember.cli", "up", "--ip", head.ip, "--num-cpus", "1"], cwd=str(REPO),
                       timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    token = head.outside(f"{head.home}/.ray/auth_token").read_text().strip()
    cluster = RayHosts(hosts, started.stdout, f"{head.ip}:6379", f"http://{head.ip}:8265", token, [])
    cluster.join(hosts.hosts["host2"])
    return cluster


@pytest.fixture(scope="session")
def ray_hosts(host_cluster: HostCluster) -> RayHosts:
    """Started once: each Ray start costs ~20 s."""
    return start_ray_hosts(host_cluster)


@pytest.fixture(scope="session")
def shared_shards(host_cluster: HostCluster, text_shards: Path) -> Path:
    """The session's text shards copied onto the cluster's shared folder."""
    return Path(shutil.copytree(text_shards, host_cluster.shared_dir / "shards"))


@contextlib.contextmanager
def shards_over_http(host: Host, shards: Path, port: int = 8000) -> Iterator[tuple[str, Path]]:
    """A plain `python -m http.server` on `host` at its own IP, serving a copy of `shards` kept in the host's
    private /tmp, which no other host sees. Yields the base URL and the server's request log."""
    folder, log = "/tmp/http-shards", host.outside("/tmp/http-shards.log")
    shutil.copytree(shards, host.outside(folder))
    argv = [sys.executable, "-u", "-m", "http.server", str(port), "--bind", host.ip, "--directory", folder]
    with open(log, "w") as output:
        server = host.popen(argv, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "Serving HTTP" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield f"http://{host.ip}:{port}", log
    finally:
        server.kill()
        server.wait()
