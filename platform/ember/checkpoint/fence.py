"""Attempt fencing: every (re)start of a run gets a new attempt id; only the current attempt may commit.

A zombie worker of an older attempt (still writing after Ray restarted the group) would otherwise
commit a checkpoint over the new attempt's history. The record lives in the run folder. Starting an
attempt and committing a checkpoint both hold `run_lock`, so no attempt can start between a commit's
fence check and its rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ATTEMPT_FILE = "attempt.json"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class Attempt:
    number: int
    id: str


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive POSIX lock on a file in the run folder (lockf: NFS forwards it to the server)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def start_attempt(run_dir: Path) -> Attempt:
    """Record a new attempt (call on one rank, then share it): a locked read-modify-write."""
    with run_lock(run_dir):
        previous = current_attempt(run_dir)
        attempt = Attempt(number=previous.number + 1 if previous else 1, id=uuid.uuid4().hex[:12])
        tmp = run_dir / f".{ATTEMPT_FILE}.{attempt.id}"
        tmp.write_text(json.dumps({"number": attempt.number, "id": attempt.id}))
        os.replace(tmp, run_dir / ATTEMPT_FILE)
    return attempt


def current_attempt(run_dir: Path) -> Attempt | None:
    try:
        record = json.loads((run_dir / ATTEMPT_FILE).read_text())
        return Attempt(int(record["number"]), str(record["id"]))
    except (OSError, ValueError, KeyError):
        return None


def is_current(run_dir: Path, attempt: Attempt) -> bool:
    return current_attempt(run_dir) == attempt
