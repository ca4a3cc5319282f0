"""Namespaced hosts for the `hosts` tier: one set per session (host1 and host2 share a folder, laptop does not).

Where namespaces cannot be made (not root, no iproute2) the tier is skipped with the reason; under CI=true
it fails instead, since CI is where this tier must run."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.hosts.harness import HostCluster, HostsUnavailable, check_namespaces_available


def require_namespaces() -> None:
    try:
        check_namespaces_available()
    except HostsUnavailable as reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the hosts tier: {reason}")
        pytest.skip(str(reason))


@pytest.fixture(scope="session")
def host_cluster() -> Iterator[HostCluster]:
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
