"""A user's mistake that only a worker can see (a corrupt shard) ends `ember run` with exit 2 after one attempt,
even when cluster.max_failures allows restarts: retrying would read the same bytes again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def test_a_user_error_in_a_worker_exits_2_after_one_attempt(tmp_path: Path) -> None:
    shard = tmp_path / "shards" / "train-000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(b"not a tar file, " * 64)  # exists, so only reading it fails
    run_dir = tmp_path / "run"
    items = [f"run_dir={run_dir}", f"data.train.urls={shard}", "data.val=null", "data.build=null",
             "cluster.num_workers=1", "cluster.max_failures=3", "logging.sample_tokens=0"]
    args = [sys.executable, "-m", "ember.cli", "run", str(REPO / "jobs" / "debug" / "tiny-dense.yaml"),
            *[part for item in items for part in ("--set", item)]]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: {shard}:" in done.stderr
    assert "Traceback" not in done.stderr
    attempts = json.loads((run_dir / "attempt.json").read_text())["number"]
    assert attempts == 1
