"""Test-only fault injection at named points: `EMBER_FAULT=point[:rank][:step][:action][@once_file]`.

Fault tests name the point where a process dies instead of racing a timer, so they are deterministic on
any machine. `rank` and `step` may be `*` (any). Actions: `kill` (SIGKILL, the default: nothing runs after
it, not even atexit), `term` (SIGTERM to this process, as a scheduler's preemption sends it) and `pause`
(write `<once_file>.paused`, then wait until `<once_file>.go` exists). With `@once_file` the fault fires
only once across restarts: it creates the file first and never fires where the file exists.

This is the only place the variable is read; production code only calls `fault_point`.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "EMBER_FAULT"
ACTIONS = ("kill", "term", "pause")
# Points of the save protocol (checkpoint/manager.py), in order, and of the training loop.
SAVE_POINTS = (
    "before_rank_files", "after_rank_files", "after_report", "after_manifest", "mid_replace", "after_rename",
    "mid_retention",
)
POINTS = (*SAVE_POINTS, "step_end", "serve_step")  # serve_step: a serving rank, before a decode step


@dataclass(frozen=True)
class Fault:
    point: str
    rank: int | None
    step: int | None
    action: str
    once_file: Path | None

    def matches(self, point: str, rank: int, step: int) -> bool:
        return (self.point == point and self.rank in (None, rank) and self.step in (None, step)
                and not (self.once_file is not None and self.once_file.exists()))


def parse_fault(text: str) -> Fault:
    spec, _, once = text.partition("@")
    given = spec.split(":")
    point, rank, step, action = given + ["", "*", "*", "kill"][len(given):]
    if point not in POINTS or action not in ACTIONS:
        raise ValueError(f"{ENV}={text}: point must be one of {', '.join(POINTS)}; action one of {ACTIONS}")
    return Fault(point, any_or_number(rank), any_or_number(step), action, Path(once) if once else None)


def any_or_number(value: str) -> int | None:
    return None if value == "*" else int(value)


@functools.cache
def configured_fault() -> Fault | None:
    text = os.environ.get(ENV, "")
    return parse_fault(text) if text else None


def fault_point(point: str, rank: int, step: int) -> None:
    """Die, get SIGTERM or pause here when EMBER_FAULT names this point (a no-op otherwise)."""
    fault = configured_fault()
    if fault is None or not fault.matches(point, rank, step):
        return
    if fault.once_file is not None:
        fault.once_file.parent.mkdir(parents=True, exist_ok=True)
        fault.once_file.touch()
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        pause_until_released(fault.once_file or Path(f"ember-fault-{os.getpid()}"))


def pause_until_released(marker: Path) -> None:
    Path(f"{marker}.paused").write_text(f"{os.getpid()}\n")
    while not Path(f"{marker}.go").exists():
        time.sleep(0.02)
