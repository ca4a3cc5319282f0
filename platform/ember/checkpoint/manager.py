"""CheckpointManager: collective save, atomic commit, verified lookup with fallback, retention.

Layout of one checkpoint: step_000123/{engine/, rank_00000.pt..., state.json, manifest.json}. How the
ranks' files get there, and why a crash at any point leaves only uncommitted leftovers, is
checkpoint/commit.py. The newest checkpoint is the newest *commit* (manifest field `commit`), which is
not always the highest step: a run restarted from scratch or from an older checkpoint commits lower steps.

Async save: each rank snapshots its tensors into host memory (checkpoint/io.py; files an engine writes
itself go to a private folder under /dev/shm), which is the only stall the training loop sees; a
background thread then serialises, moves and reports them, and rank 0's thread commits once every rank
has reported. At most one save is in flight in the whole group: the next save (or `wait()`) joins it and
re-raises anything it failed with, and no rank starts the next save before rank 0 has committed the last one
(else a rank could die writing step N+1 while step N, which the run had already passed, was still
uncommitted, and the group would resume a save earlier than it needs to).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ember.checkpoint import commit as protocol
from ember.checkpoint.fault import fault_point
from ember.checkpoint.fence import Attempt, run_lock
from ember.checkpoint.io import deferred_writes, save_file
from ember.checkpoint.manifest import MANIFEST, fsync_path, read_manifest, verify_manifest, write_manifest
from ember.errors import InternalError, UserError
from ember.world import World

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE = "state.json"
# After the barrier every rank has reported: rank 0 only waits for its storage to show the reports.
SYNC_REPORT_TIMEOUT_S = 30.0
# An async save's ranks write in the background at their own pace; a rank that fails reports at once.
ASYNC_REPORT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Retention:
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none

    def to_delete(self, newest_first: list[Path]) -> list[Path]:
        """Of valid checkpoints of one lineage, newest commit first (index 0: the one just committed)."""
        doomed = []
        for index, folder in enumerate(newest_first):
            step = step_of(folder)
            kept = index < self.keep_last or (self.keep_every and step % self.keep_every == 0)
            if not kept and index > 0:  # never the one just committed
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
    # The history this run continues: retention only counts and deletes checkpoints of it. A run that
    # starts from scratch or branches from an older checkpoint begins a new one (see train/loop.py).
    lineage: str | None = None
    verify_checksums: bool = True
    staging_root: Path | None = None  # where async saves stage engine-written files; default /dev/shm
    report_timeout_s: float | None = None  # default: SYNC_/ASYNC_REPORT_TIMEOUT_S
    copies: dict[str, Path] = field(default_factory=dict)  # files every checkpoint carries (a tokenizer.json)
    skipped: list[tuple[Path, list[str]]] = field(default_factory=list)
    _verified: dict[tuple[str, int], bool] = field(default_factory=dict)
    _pending: threading.Thread | None = None
    _failure: BaseException | None = None
    _hosts: list[str] = field(default_factory=list)
    _staged_bytes: int = 0  # what the last async save staged: the free space the next one needs

    @property
    def tag(self) -> str:
        return self.attempt.id if self.attempt is not None else "local"

    @property
    def lock_dir(self) -> Path:
        return self.run_dir if self.run_dir is not None else self.root

    # ---- saving ----
    def save(self, step: int, engine, shared_state: dict[str, Any], rank_state: dict[str, Any]) -> SaveResult:
        """Every rank calls this. shared_state is JSON (rank 0 writes it); rank_state is per rank."""
        started = time.perf_counter()
        self.wait()
        if self.async_save:  # rank 0's wait() ends with the previous commit: no rank writes this step before it
            self.world.barrier()
        layout = self._layout(step)
        fault_point("before_rank_files", layout.rank, step)
        self._prepare(layout)
        deferring = deferred_writes() if self.async_save else contextlib.nullcontext([])
        with protocol.storage_errors(layout.staged, staging=self.async_save), deferring as pending:
            (layout.staged / "engine").mkdir()
            engine.save(layout.staged / "engine")
            save_file(rank_state, layout.staged / f"rank_{self.world.rank:05d}.pt")
            if self.world.is_main:
                (layout.staged / STATE).write_text(json.dumps({"step": step, **shared_state}))
                for name, source in self.copies.items():  # rank 0's files: reported, listed and verified
                    shutil.copyfile(source, layout.staged / name)
        self.world.barrier()
        publish = _Publish(self, layout, pending)
        if self.async_save:
            self._pending = threading.Thread(target=publish.in_background, name=f"ember-ckpt-{step}", daemon=True)
            self._pending.start()
        else:
            publish.in_step()  # the commit is visible to every rank when save returns
        return SaveResult(layout.final, time.perf_counter() - started)

    def wait(self) -> None:
        """Join the save in flight, if any; raise what it failed with."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            if isinstance(failure, UserError):
                raise failure
            raise InternalError(f"background checkpoint save failed: {failure}") from failure

    def _layout(self, step: int) -> protocol.SaveLayout:
        rank = self.world.rank
        # Sync: a private folder inside the .tmp folder (moving a file there is a rename). Async: /dev/shm.
        tmp = protocol.tmp_folder(self.root, step, self.tag)
        staged = self._staging_base() / self.tag / f"step_{step:06d}" if self.async_save else tmp
        return protocol.SaveLayout(self.root, step, self.tag, rank, staged / f".rank_{rank:05d}")

    def _staging_base(self) -> Path:
        base = self.staging_root or (Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir()))
        tag = hashlib.sha256(str(self.root.absolute()).encode()).hexdigest()[:10]
        return base / f"ember-{tag}"

    def _prepare(self, layout: protocol.SaveLayout) -> None:
        """Collective: rank 0 makes the .tmp folder; every rank checks it sees it (shared storage) and has
        room to stage; all raise the same error when any rank cannot, instead of waiting on each other."""
        problem = None
        if self.world.is_main:
            problem = self._make_folder(layout.tmp, fresh=True)
        self.world.barrier()
        if problem is None and not layout.tmp.is_dir():
            problem = (f"{layout.tmp} (made by rank 0) is not visible here: put run_dir on storage every host "
                       "shares (NFS, Lustre, a cluster file system)")
        problem = problem or self._make_folder(layout.staged, fresh=True) or self._staging_room_problem()
        sights = [(socket.gethostname(), problem)]
        if self.world.world_size > 1:
            sights = [None] * self.world.world_size
            dist.all_gather_object(sights, (socket.gethostname(), problem))
        self._hosts = [host for host, _ in sights]
        for rank, (host, seen) in enumerate(sights):
            if seen is not None:
                raise UserError(f"checkpoint of step {layout.step}: rank {rank} on {host}: {seen}")

    @staticmethod
    def _make_folder(folder: Path, fresh: bool) -> str | None:
        try:
            if fresh:
                shutil.rmtree(folder, ignore_errors=True)  # a leftover of this attempt's crashed save
            folder.mkdir(parents=True)
        except OSError as exc:
            return protocol.storage_message(folder, exc)
        return None

    def _staging_room_problem(self) -> str | None:
        if not self.async_save:
            return None
        base = self._staging_base()
        free = shutil.disk_usage(base).free
        if free >= self._staged_bytes:
            return None
        return (f"async checkpoint staging needs {self._staged_bytes / 2**20:.1f} MiB in {base.parent}, "
                f"{free / 2**20:.1f} MiB are free: enlarge it (Kubernetes: an emptyDir of medium Memory on /dev/shm) "
                "or set checkpoint.async_save=false")

    def clean_stale(self) -> None:
        """At an attempt's start, on every rank: remove what dead attempts left (rank 0: in the run folder,
        under the run lock; every rank: its host's staging folders) and restore a half-replaced step."""
        if self.world is None or self.world.is_main:
            with run_lock(self.lock_dir):
                protocol.clean_leftovers(self.root)
        base = self._staging_base()
        if base.is_dir():
            for folder in base.iterdir():
                if folder.name != self.tag:
                    shutil.rmtree(folder, ignore_errors=True)

    # ---- reading ----
    def committed(self) -> list[Path]:
        """Committed checkpoint folders, newest commit first (a resumed run may commit a lower step last)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=commit_order, reverse=True)

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

    def agreed_latest_valid(self) -> Path | None:
        """Collective: rank 0 verifies and picks (one verification, not one per rank, so ranks cannot
        disagree); every rank gets its pick and its `skipped` list."""
        found = self.latest_valid(checksums=self.verify_checksums) if self.world.is_main else None
        if self.world.world_size > 1:
            box = [found, self.skipped]
            dist.broadcast_object_list(box, src=0)
            found, self.skipped = box
        return found

    def is_valid(self, folder: Path) -> bool:
        """Verified once per folder and manifest (committed checkpoints never change in place)."""
        try:
            key = (folder.name, (folder / MANIFEST).stat().st_mtime_ns)
        except OSError:
            return False
        if key not in self._verified:
            self._verified[key] = not verify_manifest(folder, checksums=self.verify_checksums)
        return self._verified[key]

    def retention_victims(self, just_committed: Path) -> list[Path]:
        """Valid checkpoints of this lineage beyond the retention policy; never `just_committed`, and
        corrupt or other-lineage folders neither count against the policy nor get deleted by it."""
        ours = [f for f in self.committed() if f == just_committed or lineage_of(f) == self.lineage]
        valid = [just_committed] + [f for f in ours if f != just_committed and self.is_valid(f)]
        return [f for f in self.retention.to_delete(valid) if f != just_committed]


@dataclass
class _Publish:
    """One save after the snapshot: every rank publishes and reports its files; rank 0 commits."""

    manager: CheckpointManager
    layout: protocol.SaveLayout
    pending: list  # writes deferred to this point (objects already snapshotted in host memory)

    def in_step(self) -> None:
        """Sync save: every rank reports, then all wait for rank 0's commit and raise the same failure."""
        world = self.manager.world
        failure = self.rank_part()
        world.barrier()
        if world.is_main and failure is None:
            failure = self.commit_catching()
        outcome = [describe_failure(failure)]
        if world.world_size > 1:
            dist.broadcast_object_list(outcome, src=0)
        if failure is not None:
            raise failure
        if outcome[0] is not None:
            kind, message = outcome[0]
            raise UserError(message) if kind == "user" else InternalError(message)

    def in_background(self) -> None:
        failure = self.rank_part()
        if failure is None and self.manager.world.is_main:
            failure = self.commit_catching()
        self.manager._failure = failure  # surfaced by the next wait()

    def rank_part(self) -> BaseException | None:
        layout, host = self.layout, self.manager._hosts[self.layout.rank]
        try:
            with protocol.storage_errors(layout.tmp):
                files, self.manager._staged_bytes = protocol.publish_rank_files(layout, self.pending)
                fault_point("after_rank_files", layout.rank, layout.step)
                protocol.write_report(layout, host, files=files)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                protocol.write_report(layout, host, error=exc)  # rank 0 learns of it at once, not at a timeout
            return exc
        fault_point("after_report", layout.rank, layout.step)
        return None

    def commit_catching(self) -> BaseException | None:
        try:
            with protocol.storage_errors(self.layout.tmp):
                self.commit()
        except BaseException as exc:
            return exc
        return None

    def commit(self) -> None:
        manager, layout = self.manager, self.layout
        timeout = manager.report_timeout_s or (ASYNC_REPORT_TIMEOUT_S if manager.async_save else SYNC_REPORT_TIMEOUT_S)
        reports = protocol.wait_for_reports(layout, manager._hosts, timeout)
        files, ranks = protocol.merge_reports(layout, reports)
        with run_lock(manager.lock_dir):  # no attempt can start between the fence check and the rename
            protocol.check_fence(layout, manager.run_dir, manager.attempt)
            write_manifest(layout.tmp, {**self.facts(), "ranks": ranks, **manager.facts}, files)
            fault_point("after_manifest", layout.rank, layout.step)
            protocol.rename_into_place(layout)
            manager._verified[(layout.final.name, (layout.final / MANIFEST).stat().st_mtime_ns)] = True
            fault_point("after_rename", layout.rank, layout.step)
            retired = [retire(layout, folder) for folder in manager.retention_victims(layout.final)]
            fsync_path(layout.root)
        if retired:
            fault_point("mid_retention", layout.rank, layout.step)
        for folder in retired:
            shutil.rmtree(folder, ignore_errors=True)

    def facts(self) -> dict[str, Any]:
        manager, world = self.manager, self.manager.world
        facts = {"step": self.layout.step, "world_size": world.world_size, "ep_size": world.ep_size,
                 "commit": next_commit_number(manager.committed()), "lineage": manager.lineage}
        if manager.attempt is not None:
            facts["attempt"] = {"number": manager.attempt.number, "id": manager.attempt.id}
        return facts


def retire(layout: protocol.SaveLayout, folder: Path) -> Path:
    aside = layout.aside(folder, "trash")
    folder.rename(aside)
    return aside


def describe_failure(failure: BaseException | None) -> tuple[str, str] | None:
    if failure is None:
        return None
    return ("user" if isinstance(failure, UserError) else "internal", str(failure))


def step_of(folder: Path) -> int:
    return int(STEP_DIR.match(folder.name).group(1))


def commit_order(folder: Path) -> tuple[int, int]:
    """(commit number, step): checkpoints of older formats, without a number, rank by step below all others."""
    manifest = read_manifest(folder)
    return (manifest_commit(manifest), step_of(folder))


def manifest_commit(manifest: dict[str, Any] | None) -> int:
    number = manifest.get("commit", 0) if isinstance(manifest, dict) else 0
    return number if isinstance(number, int) else 0


def next_commit_number(folders: list[Path]) -> int:
    return 1 + max((manifest_commit(read_manifest(f)) for f in folders), default=0)


def lineage_of(folder: Path) -> str | None:
    manifest = read_manifest(folder)
    return manifest.get("lineage") if isinstance(manifest, dict) else None


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
