"""`ember up`, `submit`, `status`, `logs`, `list`, `down` against a real Ray head on 127.0.0.1 with token auth
(this package's cluster: `ember up` starts it, `ember down` at the package's end must leave no process of it)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import shard_overrides
from tests.helpers.cli import ember
from tests.ray.cluster.conftest import EmberCluster

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def cluster(ember_cluster: EmberCluster) -> tuple[str, dict[str, str]]:
    """This package's `ember up` head (tests/ray/cluster/conftest.py): its jobs API and its `ember` commands' env."""
    return ember_cluster.dashboard, ember_cluster.env


def test_the_jobs_api_refuses_requests_without_the_token(cluster) -> None:
    address, _ = cluster
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=30)
    assert refused.value.code == 401


def test_submit_runs_a_spec_and_reports_status_and_logs(cluster, tmp_path: Path, text_shards: Path) -> None:
    address, env = cluster
    sets = [f"run_dir={tmp_path / 'run'}", *shard_overrides(text_shards), "schedule.steps=6"]
    submitted = ember("submit", str(REPO / "jobs/debug/tiny-dense.yaml"), "--address", address,
                      *[p for s in sets for p in ("--set", s)], env=env)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.split("submitted ")[1].split()[0]
    deadline, state = time.monotonic() + 300, ""
    while state not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(2)
        state = ember("status", job, "--address", address, env=env).stdout.strip()
    assert state == "SUCCEEDED", ember("logs", job, "--address", address, env=env).stdout
    logged = ember("logs", job, "--address", address, env=env).stdout
    assert "step      6/6" in logged
    assert "checkpoint saved" in logged
    assert job in ember("list", "--address", address, env=env).stdout
    assert (tmp_path / "run" / "checkpoints" / "step_000006" / "manifest.json").is_file()


def test_a_wrong_token_is_refused_by_the_cluster_and_ember_says_why(cluster) -> None:
    address, env = cluster
    refused = ember("list", "--address", address, env={**env, "RAY_AUTH_TOKEN": "not-the-token"})
    assert refused.returncode == 2
    assert "rejected the auth token" in refused.stderr


def test_a_bad_spec_is_refused_before_anything_is_sent(cluster) -> None:
    address, env = cluster
    refused = ember("submit", str(REPO / "jobs/debug/tiny-dense.yaml"), "--address", address,
                    "--set", "engine.zero_stage=2", env=env)
    assert refused.returncode == 2
    assert "engine.zero_stage" in refused.stderr
    assert "engine-debug" not in ember("list", "--address", address, env=env).stdout


def test_ember_run_beside_a_running_cluster_says_how_to_run_on_it(ember_cluster: EmberCluster, tmp_path: Path) -> None:
    """`ember run` with the embedded Ray while an `ember up` head runs here: one note naming the cluster and the
    setting that uses it. Missing shards stop the run (exit 2) before any Ray starts."""
    env = ember_cluster.env
    no_shards = ["--set", "data.build=null", "--set", f"data.train.urls={tmp_path}/none-{{000000..000001}}.tar"]
    beside = ember("run", str(REPO / "jobs/debug/tiny-dense.yaml"), *no_shards, env=env)
    assert beside.returncode == 2, beside.stdout + beside.stderr
    assert f"the `ember up` cluster '{ember_cluster.name}' runs on this machine" in beside.stderr
    assert "--set cluster.address=auto" in beside.stderr
    assert "none-000000.tar" in beside.stderr
    alone = ember("run", str(REPO / "jobs/debug/tiny-dense.yaml"), *no_shards,
                  env={**env, "EMBER_HOME": str(tmp_path / "no-clusters")})
    assert alone.returncode == 2
    assert "none-000000.tar" in alone.stderr
    assert "note:" not in alone.stderr  # no cluster recorded in that EMBER_HOME
