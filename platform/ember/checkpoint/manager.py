"""CheckpointManager: save (collective), atomic commit, verified lookup, retention.

Layout of one checkpoint: step_000123/{engine/, rank_00000.pt..., state.json, manifest.json}.
Writing happens in step_000123.tmp/; the rename to step_000123/ after the manifest is the commit, so a
crash mid-save leaves only a .tmp folder that no resume ever reads.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ember.checkpoint.manifest import fsync_path, read_manifest, verify_manifest, write_manifest
from ember.errors import UserError
from ember.world import World

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE = "state.json"


class CheckpointManager:
    def __init__(self, root: Path, world: World, keep_last: int, facts: dict[str, Any] | None = None) -> None:
        self.root = root
        self.world = world
        self.keep_last = keep_last
        self.facts = facts or {}

    def save(self, step: int, engine, shared_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Every rank calls this. shared_state is JSON (rank 0 writes it); rank_state is per rank."""
        tmp = self.root / f"step_{step:06d}.tmp"
        final = self.root / f"step_{step:06d}"
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "engine").mkdir(parents=True)
        self.world.barrier()
        engine.save(tmp / "engine")
        torch.save(rank_state, tmp / f"rank_{self.world.rank:05d}.pt")
        self.world.barrier()
        if self.world.is_main:
            (tmp / STATE).write_text(json.dumps({"step": step, **shared_state}))
            facts = {"step": step, "world_size": self.world.world_size, "ep_size": self.world.ep_size, **self.facts}
            write_manifest(tmp, facts)
            shutil.rmtree(final, ignore_errors=True)  # a same-step leftover from an earlier attempt
            tmp.rename(final)
            fsync_path(self.root)
            self._apply_retention()
        self.world.barrier()
        return final

    def committed(self) -> list[Path]:
        """Committed checkpoint folders, newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)), reverse=True)

    def latest_valid(self, checksums: bool = False) -> Path | None:
        for folder in self.committed():
            if not verify_manifest(folder, checksums=checksums):
                return folder
        return None

    def _apply_retention(self) -> None:
        for folder in self.committed()[self.keep_last :]:
            shutil.rmtree(folder, ignore_errors=True)


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE).read_text())


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder from either a run folder (newest valid) or a checkpoint folder itself."""
    path = Path(path)
    if read_manifest(path) is not None:
        problems = verify_manifest(path, checksums=True)
        if problems:
            raise UserError(f"{path}: checkpoint does not verify: " + "; ".join(problems[:3]))
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        raise UserError(f"{path}: no such run or checkpoint folder")
    manager = CheckpointManager(root, world=None, keep_last=1)  # read-only use needs no world
    found = manager.latest_valid(checksums=True)
    if found is None:
        raise UserError(f"{path}: no committed, verified checkpoint under {root}")
    return found
