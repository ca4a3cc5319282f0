"""The harness itself: hosts that reach each other by address and differ in name, /tmp and home folder,
a folder shared by the cluster hosts only, and nothing left behind by `down`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.hosts.conftest import made_hosts, require_namespaces
from tests.hosts.harness import HostCluster

pytestmark = pytest.mark.hosts


@pytest.fixture(scope="module")
def host_cluster() -> Iterator[HostCluster]:
    """Hosts of this module's own (the session's may have lost one to a failure test)."""
    with made_hosts() as cluster:
        yield cluster

# host2 answers one TCP connection with the address it saw the caller at
ECHO_PEER = """
import socket, sys
server = socket.create_server((sys.argv[1], 7000))
print("listening", flush=True)
connection, (peer, _) = server.accept()
connection.sendall(peer.encode())
"""
CONNECT = "import socket, sys; print(socket.create_connection((sys.argv[1], 7000), timeout=10).recv(64).decode())"


def test_hosts_reach_each_other_at_their_own_addresses(host_cluster: HostCluster) -> None:
    host1, host2 = host_cluster.hosts["host1"], host_cluster.hosts["host2"]
    server = host2.popen([sys.executable, "-c", ECHO_PEER, host2.ip], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    seen = host1.run([sys.executable, "-c", CONNECT, host2.ip], check=True).stdout.strip()
    assert seen == host1.ip  # the connection came from host1's own address
    assert server.wait(timeout=10) == 0


def test_hosts_have_their_own_name_tmp_and_home(host_cluster: HostCluster) -> None:
    host1, host2 = host_cluster.hosts["host1"], host_cluster.hosts["host2"]
    assert [host.run("hostname", check=True).stdout.strip() for host in (host1, host2)] == ["host1", "host2"]
    for folder in ("/tmp", "/dev/shm", "$HOME"):
        host1.run(f"echo host1 > {folder}/mine", check=True)
        assert host2.run(f"cat {folder}/mine").returncode != 0, f"{folder} is not private"
        assert host1.run(f"cat {folder}/mine", check=True).stdout == "host1\n"
    assert host1.run("echo $HOME", check=True).stdout.strip() == host1.home
    assert host1.outside("/tmp/mine").read_text() == "host1\n"


def test_only_cluster_hosts_see_the_shared_folder(host_cluster: HostCluster) -> None:
    host1, host2, laptop = (host_cluster.hosts[name] for name in ("host1", "host2", "laptop"))
    shared = host_cluster.shared_dir / "written-by-host1"
    host1.run(f"echo hello > {shared}", check=True)
    assert host2.run(f"cat {shared}", check=True).stdout == "hello\n"
    assert laptop.run(f"cat {shared}").returncode != 0
    assert laptop.run(f"test -e {host_cluster.shared_dir}").returncode != 0


def test_down_removes_namespaces_links_and_processes() -> None:
    require_namespaces()
    cluster = HostCluster.create(owner_pid=os.getpid())
    try:
        host = cluster.add_host("lone")
        sleeper = host.popen(["sleep", "600"])
        deadline = time.monotonic() + 10
        while sleeper.pid not in host.pids():  # nsenter enters the host's namespaces just after it starts
            assert time.monotonic() < deadline, "the process never appeared in the host's namespace"
            time.sleep(0.01)
        assert host.holder_pid in host.pids()
    finally:
        cluster.down()
    assert host.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert cluster.bridge not in links
    assert host.link not in links
    assert sleeper.poll() is not None
    assert not cluster.root.exists()
