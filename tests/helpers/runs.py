"""Reading what a run left in its folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file


def events(run_dir: Path) -> list[dict]:
    """The run's events.jsonl (rank 0's progress events), oldest first; none before the file exists."""
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_weights(run_dir: Path, folder: Path) -> dict:
    """The run's newest checkpoint as `ember ckpt export` hands it to a user, exported into `folder`."""
    out = folder / f"{run_dir.name}.safetensors"
    subprocess.run([sys.executable, "-m", "ember.cli", "ckpt", "export", str(run_dir), "--out", str(out)], check=True)
    return load_file(str(out))


def assert_bitwise_equal(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    different = [name for name in left if not left[name].equal(right[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
