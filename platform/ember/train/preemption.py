"""Preemption: a request becomes a checkpoint at the next step boundary and a clean, resumable exit.

A request is either a signal (SIGTERM, or SIGUSR1 that Slurm sends before the time limit) caught in
this process - only possible on the main thread, as under torchrun - or the request file in the run
folder, which `ember run`'s driver writes when *it* gets the signal (Ray runs the training loop on a
worker thread, where Python cannot install signal handlers). Every rank checks at each step boundary
and all agree (max over ranks), so they stop on the same step.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ember.errors import RESUMABLE_EXIT_CODE  # noqa: F401  (re-exported for the launchers)
from ember.world import World

REQUEST_FILE = "PREEMPT"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def request_preemption(run_dir: Path, reason: str) -> None:
    """Ask the workers of a run to checkpoint and stop (used by the driver's signal handler)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / REQUEST_FILE).write_text(f"{reason} at {time.time():.0f}\n")


class PreemptionWatch:
    def __init__(self, run_dir: Path, world: World) -> None:
        self.request_file = run_dir / REQUEST_FILE
        self.world = world
        self.signalled: str | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        self.signalled = signal.Signals(signum).name

    def clear_stale_request(self) -> None:
        """A request file left from a previous attempt was served already; a new attempt starts clean."""
        if self.world.is_main:
            self.request_file.unlink(missing_ok=True)
        self.world.barrier()

    def should_stop(self) -> bool:
        """Collective: true on every rank when any rank saw a request."""
        local = self.signalled is not None or self.request_file.exists()
        if self.world.world_size == 1:
            return local
        flag = torch.tensor([int(local)], device=self.world.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
