"""One `ember up` cluster for the modules of this package, as a user keeps one for many runs (README, *Many runs
on one machine*): the jobs API tests submit to it, and the `ember run`s whose subject is not the embedded Ray
itself run on it with `cluster.address=auto`, each skipping the ~10 s of starting and stopping a Ray of its own
(bench/RESULTS.md, *Start-up*). The cluster lives as long as this package: an idle Ray still takes a share of
the 2 cores, which the ray tier's other modules (serving, a fault handed down by a raylet, user errors, all on
an embedded Ray of their own, as `ember run` starts by default) would pay for."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import isolated_env
from tests.helpers.cli import ember
from tests.helpers.distributed import free_port

ON_CLUSTER = "cluster.address=auto"  # with RAY_ADDRESS naming the cluster's GCS, as `ember submit`'s jobs run


@dataclass(frozen=True)
class EmberCluster:
    name: str
    dashboard: str  # http://127.0.0.1:PORT, the jobs API
    gcs: str  # 127.0.0.1:PORT, what `cluster.address=auto` finds in RAY_ADDRESS
    env: dict[str, str]  # for `ember` commands: this cluster's EMBER_HOME and the tests' token, no RAY_ADDRESS

    def run_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) for an `ember run --set cluster.address=auto` here."""
        return {**(os.environ if base is None else base), "RAY_ADDRESS": self.gcs}


@pytest.fixture(scope="package")
def ember_cluster(tmp_path_factory: pytest.TempPathFactory, ray_auth_folder: Path) -> Iterator[EmberCluster]:
    """`ember up` on 127.0.0.1 with 4 logical CPUs (room for a run's 2 workers beside a submitted job), its own
    ports and EMBER_HOME; `ember down` at the package's end must leave no process of it."""
    home = tmp_path_factory.mktemp("ember-home")
    port, gcs_port, name = free_port(), free_port(), f"t{os.getpid()}"
    env = isolated_env(ray_auth_folder, EMBER_HOME=str(home))
    started = ember("up", "--port", str(port), "--gcs-port", str(gcs_port), "--num-cpus", "4", "--name", name,
                    env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield EmberCluster(name, f"http://127.0.0.1:{port}", f"127.0.0.1:{gcs_port}", env)
    finally:
        stopped = ember("down", "--name", name, env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert not [line for line in subprocess.run(["ps", "axww"], capture_output=True, text=True).stdout.splitlines()
                    if f"ember-ray-{name}" in line]
