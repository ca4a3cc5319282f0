"""Reading what a run left in its folder."""

from __future__ import annotations

import json
from pathlib import Path


def events(run_dir: Path) -> list[dict]:
    """The run's events.jsonl (rank 0's progress events), oldest first; none before the file exists."""
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
