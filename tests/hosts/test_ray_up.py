"""cluster/onprem.yaml as written, with Ray's own cluster launcher over real SSH: from a laptop outside the cluster,
`ray up` reaches a head and a worker host (OpenSSH's server on each, a key this test makes), copies the checkout
and the laptop's token to both (file_mounts), installs ember there, and starts Ray with token auth; `ember submit`
from the laptop trains an EP=2 job with one rank on each host to SUCCEEDED; `ray down` and `ray stop` on the worker
(the recipe's teardown) leave no Ray process on either host."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import shard_overrides
from tests.hosts.conftest import unavailable
from tests.hosts.harness import Host, HostCluster, HostsUnavailable

pytestmark = pytest.mark.hosts
REPO = Path(__file__).resolve().parents[2]
# What a login session on a cluster host has on PATH: the Python that ember and Ray are installed into
LOGIN_PATH = f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SSH = ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
       "-i", "/home/ember/.ssh/id_ed25519"]


@dataclass
class LaunchedHosts:
    laptop: Host
    head: Host
    worker: Host
    config: str  # the laptop's copy of cluster/onprem.yaml with these hosts' addresses

    def on_laptop(self, argv: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        """A command on the laptop from the checkout (where a user runs `ray up` and `ember submit`)."""
        return self.laptop.run(argv, cwd=str(REPO), timeout=timeout, env=env)

    def ssh(self, host: Host, command: str) -> subprocess.CompletedProcess:
        return self.on_laptop([*SSH, f"root@{host.ip}", command], timeout=120)

    def ray_processes(self, host: Host) -> list[str]:
        """Command lines of Ray's processes on `host` (its sshd and login shells excepted)."""
        names = ("raylet", "gcs_server", "ray::", "dashboard", "ember")
        return [line for line in host.command_lines() if any(name in line for name in names)]


def onprem_config(head: Host, worker: Host) -> dict:
    """cluster/onprem.yaml with the only lines a user edits: the machines' addresses and the SSH login."""
    config = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    config["provider"].update(head_ip=head.ip, worker_ips=[worker.ip])
    config["auth"]["ssh_user"] = "root"  # these hosts' login: root, home /home/ember
    return config


@pytest.fixture(scope="module")
def launched(host_cluster: HostCluster) -> Iterator[LaunchedHosts]:
    if not all(Path(p).exists() for p in ("/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/rsync")):
        unavailable("`ray up` over SSH", HostsUnavailable("OpenSSH or rsync missing: run `bash .ci/hosts-packages.sh`"))
    names = ["rayhead", "rayworker", "raylaptop"]
    head, worker = host_cluster.add_host(names[0], login=True), host_cluster.add_host(names[1], login=True)
    laptop = host_cluster.add_host(names[2], shared=False, login=True)
    try:
        key = laptop.outside("/home/ember/.ssh/id_ed25519")
        key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        for host in (head, worker):
            host.start_sshd(Path(f"{key}.pub").read_text(), LOGIN_PATH)
        config = "/tmp/onprem.yaml"
        laptop.outside(config).write_text(yaml.safe_dump(onprem_config(head, worker), sort_keys=False))
        yield LaunchedHosts(laptop, head, worker, config)
    finally:
        for name in names:
            host_cluster.remove_host(name)


def ray_status(launched: LaunchedHosts) -> str:
    """`ray status` on the head, as its user would run it there (a client of a token cluster names the mode)."""
    status = launched.ssh(launched.head, "RAY_AUTH_MODE=token ray status")
    return status.stdout + status.stderr


def active_nodes(status: str) -> int:
    """Alive nodes in `ray status`: lines under "Active:" read "2 local.cluster.node" (the v1 autoscaler's count
    per node type) or "1 node_<id>"."""
    active = status.split("Active:")[-1].split("Pending:")[0] if "Active:" in status else ""
    return sum(int(line.split()[0]) for line in active.splitlines() if line.split()[:1] and line.split()[0].isdigit())


def test_ray_up_over_ssh_then_submit_then_ray_down(launched: LaunchedHosts, host_cluster: HostCluster,
                                                   text_shards: Path) -> None:
    laptop = launched.laptop
    made = launched.on_laptop(["ray", "get-auth-token", "--generate"])
    assert made.returncode == 0, made.stderr
    token = laptop.outside("/home/ember/.ray/auth_token").read_text().strip()

    # README's command: the v1 autoscaler is the one that starts the provider's worker machines (see the recipe)
    up = launched.on_laptop(["ray", "up", "--yes", "--no-config-cache", launched.config],
                            RAY_UP_enable_autoscaler_v2="0")
    assert up.returncode == 0, (up.stdout + up.stderr)[-6000:]
    deadline = time.monotonic() + 400  # the head's autoscaler sets the worker up over SSH (rsync, pip, ray start)
    while active_nodes(status := ray_status(launched)) < 2:
        monitor = launched.ssh(launched.head, "tail -30 /tmp/ray/session_latest/logs/monitor.*").stdout
        assert time.monotonic() < deadline, (status + monitor)[-6000:]
        time.sleep(3)
    # the token reached both hosts through file_mounts: the head's Ray started with it, the worker joined with it
    for host in (launched.head, launched.worker):
        assert launched.ssh(host, "cat ~/.ray/auth_token").stdout.strip() == token

    shards = Path(shutil.copytree(text_shards, host_cluster.shared_dir / "ray-up-shards"))
    run_dir = host_cluster.shared_dir / "runs" / "ray-up"
    sets = [f"run_dir={run_dir}", *shard_overrides(shards), "schedule.steps=20", "checkpoint.every_n_steps=10",
            "logging.sample_tokens=0", "cluster.cpus_per_worker=2"]  # 2 CPUs per host: one rank on each
    dashboard = f"http://{launched.head.ip}:8265"
    submitted = launched.on_laptop([sys.executable, "-m", "ember.cli", "submit", "jobs/debug/tiny-moe.yaml",
                                    "--address", dashboard, "--shared", str(host_cluster.shared_dir),
                                    *[p for s in sets for p in ("--set", s)]])
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = submitted.stdout.split("submitted ")[1].split()[0]
    logs = launched.on_laptop([sys.executable, "-m", "ember.cli", "logs", job, "--follow", "--address", dashboard])
    status = launched.on_laptop([sys.executable, "-m", "ember.cli", "status", job, "--address", dashboard])
    assert status.stdout.strip() == "SUCCEEDED", logs.stdout[-4000:] + logs.stderr[-2000:]
    manifest = yaml.safe_load((run_dir / "checkpoints" / "step_000020" / "manifest.json").read_text())
    assert sorted(rank["host"] for rank in manifest["placement"]["ranks"]) == ["rayhead", "rayworker"]

    # the recipe's teardown: `ray down` stops the head's Ray; the local provider leaves the workers' to `ray stop`
    down = launched.on_laptop(["ray", "down", "--yes", launched.config])
    assert down.returncode == 0, (down.stdout + down.stderr)[-4000:]
    stopped = launched.ssh(launched.worker, "ray stop")
    assert stopped.returncode == 0, stopped.stderr
    hosts, deadline = (launched.head, launched.worker), time.monotonic() + 60
    while any(launched.ray_processes(host) for host in hosts):
        assert time.monotonic() < deadline, {host.name: launched.ray_processes(host) for host in hosts}
        time.sleep(0.5)
