"""The commit protocol of one checkpoint, shaped like torch DCP's: every rank reports what it wrote, and
the coordinator (rank 0) commits only what all reported.

1. Every rank writes into its own staging folder (inside the attempt's .tmp folder, or under /dev/shm for
   an async save), then moves its files into `step_N.<attempt>.tmp/`, fsyncs and hashes them, and writes
   its report (`.report_rank_R.json`: host, names, sizes, sha256 - or the error it failed with).
2. Rank 0 waits for every report (bounded; a missing one is named by rank and host), checks that every
   reported file is there in its own view of the storage, then, holding the run lock: checks the fence,
   writes manifest.json (files per rank) and renames the .tmp folder to `step_N/` - the commit.
3. Retention renames the checkpoints it retires aside (still under the lock), then deletes them.

Everything a save leaves behind is named by its attempt, so a zombie of an older attempt can neither
satisfy nor delete the new attempt's files; `clean_leftovers` tidies what dead attempts left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.checkpoint.fault import fault_point
from ember.checkpoint.fence import Attempt, is_current
from ember.checkpoint.io import write_pending
from ember.checkpoint.manifest import describe_file, fsync_path
from ember.errors import InternalError, UserError

REPORT = ".report_rank_{:05d}.json"
FULL_BYTES = 1 << 20  # a file system with less free space than this counts as full
LEFTOVER = re.compile(r"^(step_\d{6,})(\.\w+)?\.(tmp|old|trash)$")


@dataclass(frozen=True)
class SaveLayout:
    """Where one rank's part of one save lives."""

    root: Path
    step: int
    tag: str  # the attempt id ("local" without fencing)
    rank: int
    staged: Path  # this rank's private staging folder

    @property
    def tmp(self) -> Path:
        return tmp_folder(self.root, self.step, self.tag)

    @property
    def final(self) -> Path:
        return self.root / f"step_{self.step:06d}"

    def report(self, rank: int) -> Path:
        return self.tmp / REPORT.format(rank)

    def aside(self, folder: Path, kind: str) -> Path:
        return folder.with_name(f"{folder.name}.{self.tag}.{kind}")


def tmp_folder(root: Path, step: int, tag: str) -> Path:
    """Where one attempt gathers the files of one step's checkpoint before the commit."""
    return root / f"step_{step:06d}.{tag}.tmp"


def storage_message(path: Path, exc: OSError) -> str:
    """One line naming the folder and the fix, for a failed checkpoint write."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        fix = "the device is full: free space, lower checkpoint.keep_last, or point run_dir elsewhere"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "it is not writable: point run_dir at a folder this user can write"
    else:
        fix = "check that run_dir is a writable folder"
    return f"{path}: cannot write the checkpoint ({reason}); {fix}"


@contextlib.contextmanager
def storage_errors(path: Path, staging: bool = False) -> Iterator[None]:
    """OSError -> UserError naming `path` and the fix (for an async save's staging folder: its own fix)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        cause = os_error_of(exc, path)
        if cause is None:
            raise
        message = staging_message(path, cause) if staging else storage_message(path, cause)
        raise UserError(message) from exc


def os_error_of(exc: BaseException, path: Path) -> OSError | None:
    """The OSError behind a failed write: torch.save reports a full disk as a RuntimeError of its writer,
    with the OSError as context when it wrote through a Python file, else with nothing to go on."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, OSError):
            return current
        current = current.__cause__ or current.__context__
    folder = next((p for p in (path, *path.parents) if p.exists()), None)
    if folder is not None and shutil.disk_usage(folder).free < FULL_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def staging_message(path: Path, exc: OSError) -> str:
    return (f"{path}: async checkpoint staging failed ({exc.strerror or exc}); enlarge that file system "
            "(Kubernetes: an emptyDir of medium Memory on /dev/shm) or set checkpoint.async_save=false")


# ---- every rank ----
def publish_rank_files(layout: SaveLayout, pending: list) -> tuple[dict[str, dict[str, Any]], int]:
    """Move (or write, for deferred writes) this rank's files into the .tmp folder; fsync and describe them.
    Also returns the bytes the staging folder held (what the next async save needs there)."""
    written = write_pending(pending, layout.staged, layout.tmp)
    staged = sorted(p for p in layout.staged.rglob("*") if p.is_file())
    staged_bytes = sum(path.stat().st_size for path in staged)
    moved = [move_into(path, layout.tmp / path.relative_to(layout.staged)) for path in staged]
    files = dict(describe_file(layout.tmp, path) for path in written + moved)
    for folder in {path.parent for path in written + moved}:
        fsync_path(folder)
    shutil.rmtree(layout.staged, ignore_errors=True)
    return files, staged_bytes


def move_into(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copyfile(source, target)  # from /dev/shm to the run's storage
    return target


def write_report(layout: SaveLayout, host: str, files: dict | None = None, error: BaseException | None = None) -> None:
    report: dict[str, Any] = {"rank": layout.rank, "host": host, "attempt": layout.tag}
    if error is None:
        report["files"] = files
    else:
        report["error"] = str(error)
        report["user_error"] = isinstance(error, UserError)
    target = layout.report(layout.rank)
    part = target.with_name(target.name + ".part")
    part.write_text(json.dumps(report))
    fsync_path(part)
    os.replace(part, target)
    fsync_path(layout.tmp)


# ---- rank 0 ----
def wait_for_reports(layout: SaveLayout, hosts: list[str], timeout_s: float) -> dict[int, dict[str, Any]]:
    """Every rank's report; a rank's error re-raised at once, a missing report named after `timeout_s`."""
    reports: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for rank in set(range(len(hosts))) - reports.keys():
            report = read_report(layout, rank)
            if report is not None:
                reports[rank] = report
                raise_reported_error(report, hosts)
        if len(reports) == len(hosts):
            return reports
        if time.monotonic() > deadline:
            missing = sorted(set(range(len(hosts))) - reports.keys())
            named = ", ".join(f"rank {rank} on {hosts[rank]}" for rank in missing)
            raise InternalError(
                f"{layout.tmp}: no report from {named} within {timeout_s:.0f} s (did it die?); left uncommitted"
            )
        time.sleep(0.02)


def read_report(layout: SaveLayout, rank: int) -> dict[str, Any] | None:
    try:
        report = json.loads(layout.report(rank).read_text())
    except (OSError, ValueError):
        return None
    return report if report.get("attempt") == layout.tag else None


def raise_reported_error(report: dict[str, Any], hosts: list[str]) -> None:
    if "error" not in report:
        return
    rank = report["rank"]
    message = f"rank {rank} on {hosts[rank]} could not write its checkpoint files: {report['error']}"
    raise UserError(message) if report.get("user_error") else InternalError(message)


def merge_reports(layout: SaveLayout, reports: dict[int, dict[str, Any]]) -> tuple[dict, dict]:
    """The manifest's flat file list and its per-rank record; each file checked in rank 0's view."""
    files: dict[str, dict[str, Any]] = {}
    ranks = {}
    for rank, report in sorted(reports.items()):
        ranks[str(rank)] = {"host": report["host"], "files": sorted(report["files"])}
        for name, described in report["files"].items():
            if name in files and files[name]["sha256"] != described["sha256"]:
                first = files[name]["rank"]
                raise InternalError(f"{layout.tmp / name}: written differently by ranks {first} and {rank}")
            check_visible(layout.tmp / name, described, report)
            files[name] = {**described, "rank": rank}
    return files, ranks


def check_visible(path: Path, described: dict[str, Any], report: dict[str, Any]) -> None:
    size = path.stat().st_size if path.is_file() else None
    if size != described["size"]:
        seen = "nothing" if size is None else f"{size} bytes"
        raise UserError(
            f"rank {report['rank']} on {report['host']} wrote {path} ({described['size']} bytes) but rank 0 sees "
            f"{seen}: put run_dir on storage every host shares (NFS, Lustre, a cluster file system)"
        )


def check_fence(layout: SaveLayout, run_dir: Path | None, attempt: Attempt | None) -> None:
    if attempt is not None and not is_current(run_dir, attempt):
        shutil.rmtree(layout.tmp, ignore_errors=True)  # only this attempt's own folder
        raise InternalError(
            f"refusing to commit {layout.final.name}: attempt {attempt.number} is stale "
            "(a newer attempt of this run has started)"
        )


def rename_into_place(layout: SaveLayout) -> None:
    """The commit. A same-step folder is renamed aside first and deleted only once the new one is in place."""
    aside = layout.aside(layout.final, "old") if layout.final.exists() else None
    if aside is not None:
        os.rename(layout.final, aside)
        fsync_path(layout.root)
        fault_point("mid_replace", layout.rank, layout.step)
    os.rename(layout.tmp, layout.final)
    fsync_path(layout.root)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def clean_leftovers(root: Path) -> None:
    """What dead attempts left: .tmp and retired folders go; a same-step folder renamed aside by a save that
    died before its replacement was in place goes back. Call holding the run lock, at an attempt's start."""
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        match = LEFTOVER.match(folder.name)
        if match is None:
            continue
        original = root / match.group(1)
        if match.group(3) == "old" and not original.exists():
            os.rename(folder, original)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    fsync_path(root)
