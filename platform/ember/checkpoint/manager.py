"""CheckpointManager: collective save, atomic commit, verified lookup with fallback, retention.

Layout of one checkpoint: step_000123/{engine/, rank_00000.pt..., state.json, manifest.json}.
Files are gathered in step_000123.tmp/; the rename to step_000123/ after the manifest is on disk is the
commit, so a crash mid-save leaves only a .tmp folder that no resume ever reads.

Async save: each rank snapshots its tensors into host memory (checkpoint/io.py; files an engine writes
itself go to a private folder under /dev/shm), which is the only stall the training loop sees; a
background thread then serialises and copies everything into the .tmp folder and marks it done, and
rank 0's thread commits once every rank's mark is there. At most one save is in
flight; the next save (or `wait()`) joins it and re-raises anything it failed with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.checkpoint.fence import Attempt, is_current
from ember.checkpoint.io import deferred_writes, save_file, write_pending
from ember.checkpoint.manifest import fsync_path, read_manifest, verify_manifest, write_manifest
from ember.errors import InternalError, UserError
from ember.world import World

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE = "state.json"
DONE_MARK = ".done_rank_{:05d}"
PUBLISH_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Retention:
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none

    def to_delete(self, newest_first: list[Path]) -> list[Path]:
        doomed = []
        for index, folder in enumerate(newest_first):
            step = step_of(folder)
            kept = index < self.keep_last or (self.keep_every and step % self.keep_every == 0)
            if not kept and index > 0:  # never the newest
                doomed.append(folder)
        return doomed


@dataclass
class SaveResult:
    path: Path  # where the checkpoint lands once committed
    stall_s: float  # how long the training loop waited


@dataclass
class CheckpointManager:
    root: Path
    world: World | None
    retention: Retention = field(default_factory=Retention)
    facts: dict[str, Any] = field(default_factory=dict)
    attempt: Attempt | None = None
    run_dir: Path | None = None
    async_save: bool = False
    copies: dict[str, Path] = field(default_factory=dict)  # files every checkpoint carries (a tokenizer.json)
    skipped: list[tuple[Path, list[str]]] = field(default_factory=list)
    _pending: threading.Thread | None = None
    _failure: BaseException | None = None

    # ---- saving ----
    def save(self, step: int, engine, shared_state: dict[str, Any], rank_state: dict[str, Any]) -> SaveResult:
        """Every rank calls this. shared_state is JSON (rank 0 writes it); rank_state is per rank."""
        started = time.perf_counter()
        self.wait()
        tmp, final = self.root / f"step_{step:06d}.tmp", self.root / f"step_{step:06d}"
        target = self._staging_dir(step) if self.async_save else tmp
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if self.async_save:
            shutil.rmtree(target, ignore_errors=True)  # a leftover of a crashed save
        self.world.barrier()
        (target / "engine").mkdir(parents=True, exist_ok=True)
        with deferred_writes() if self.async_save else contextlib.nullcontext([]) as pending:
            engine.save(target / "engine")
            save_file(rank_state, target / f"rank_{self.world.rank:05d}.pt")
        self.world.barrier()
        publish = _Publish(self, step, target, tmp, final, shared_state, pending)
        if self.async_save:
            self._pending = threading.Thread(target=publish.run_catching, name=f"ember-ckpt-{step}", daemon=True)
            self._pending.start()
        else:
            publish.run()
            self.world.barrier()  # the commit is visible to every rank when save returns
        return SaveResult(final, time.perf_counter() - started)

    def wait(self) -> None:
        """Join the save in flight, if any; raise what it failed with."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise InternalError(f"background checkpoint save failed: {failure}") from failure

    def _staging_dir(self, step: int) -> Path:
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        tag = hashlib.sha256(str(self.root.absolute()).encode()).hexdigest()[:10]
        return base / f"ember-{tag}" / f"step_{step:06d}" / f"rank_{self.world.rank:05d}"

    # ---- reading ----
    def committed(self) -> list[Path]:
        """Committed checkpoint folders, newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=step_of, reverse=True)

    def latest_valid(self, checksums: bool = True) -> Path | None:
        """The newest checkpoint whose manifest verifies; bad ones are recorded in `skipped` and passed over."""
        self.skipped = []
        for folder in self.committed():
            problems = verify_manifest(folder, checksums=checksums)
            if not problems:
                return folder
            log.warning("skipping checkpoint %s: %s", folder, "; ".join(problems[:3]))
            self.skipped.append((folder, problems))
        return None


@dataclass
class _Publish:
    """Move one rank's staged files into the .tmp folder; on rank 0, commit when all ranks are done."""

    manager: CheckpointManager
    step: int
    staged: Path
    tmp: Path
    final: Path
    shared_state: dict[str, Any]
    pending: list  # writes deferred to this thread (objects already snapshotted in host memory)

    def run_catching(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # surfaced by the next wait()
            self.manager._failure = exc

    def run(self) -> None:
        world = self.manager.world
        if self.staged != self.tmp:
            write_pending(self.pending, self.staged, self.tmp)
            shutil.copytree(self.staged, self.tmp, dirs_exist_ok=True)  # files engines wrote themselves
            shutil.rmtree(self.staged, ignore_errors=True)  # only this rank's: others may still be copying
            with contextlib.suppress(OSError):
                self.staged.parent.rmdir()  # the last rank out removes the step folder
        mark = self.tmp / DONE_MARK.format(world.rank)
        mark.touch()
        if world.is_main:
            self._wait_for_all_ranks()
            self._commit()

    def _wait_for_all_ranks(self) -> None:
        marks = [self.tmp / DONE_MARK.format(rank) for rank in range(self.manager.world.world_size)]
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        while not all(mark.exists() for mark in marks):
            if time.monotonic() > deadline:
                raise InternalError(f"{self.tmp}: not every rank finished writing; left uncommitted")
            time.sleep(0.05)
        for mark in marks:
            mark.unlink()

    def _commit(self) -> None:
        manager = self.manager
        if manager.attempt is not None and not is_current(manager.run_dir, manager.attempt):
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise InternalError(
                f"refusing to commit {self.final.name}: attempt {manager.attempt.number} is stale "
                "(a newer attempt of this run has started)"
            )
        (self.tmp / STATE).write_text(json.dumps({"step": self.step, **self.shared_state}))
        facts = {"step": self.step, "world_size": manager.world.world_size, "ep_size": manager.world.ep_size}
        if manager.attempt is not None:
            facts["attempt"] = {"number": manager.attempt.number, "id": manager.attempt.id}
        for name, source in manager.copies.items():
            shutil.copyfile(source, self.tmp / name)
        write_manifest(self.tmp, {**facts, **manager.facts})
        shutil.rmtree(self.final, ignore_errors=True)  # a same-step leftover from an earlier attempt
        self.tmp.rename(self.final)
        fsync_path(manager.root)
        for folder in manager.retention.to_delete(manager.committed()):
            shutil.rmtree(folder, ignore_errors=True)


def step_of(folder: Path) -> int:
    return int(STEP_DIR.match(folder.name).group(1))


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
    found = CheckpointManager(root, world=None).latest_valid(checksums=True)
    if found is None:
        raise UserError(f"{path}: no committed, verified checkpoint under {root}")
    return found
