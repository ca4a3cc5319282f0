"""Preemption: a request becomes a checkpoint at the next step boundary and a clean, resumable exit.

A request is either a signal (SIGTERM, or SIGUSR1 that Slurm sends before the time limit) caught in
this process - only possible on the main thread, as under torchrun - or the request file in the run
folder, which `ember run`'s driver writes when *it* gets the signal (Ray runs the training loop on a
worker thread, where Python cannot install signal handlers). Under Ray a third kind: a node of the job's
placement is draining (its `ember up --block` got SIGTERM, or an autoscaler preempts it); rank 0 asks the GCS at
a step boundary at most every DRAIN_POLL_S. Every rank checks at each step boundary and all agree (max over
ranks), so they stop on the same step.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ember.errors import RESUMABLE_EXIT_CODE  # noqa: F401  (re-exported for the launchers)
from ember.world import World

REQUEST_FILE = "PREEMPT"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DRAIN_POLL_S = 2.0
NODE_DRAINING = "node draining"  # the reason a stop was asked for, when it was a drain (not a signal or file)


def request_preemption(run_dir: Path, reason: str) -> None:
    """Ask the workers of a run to checkpoint and stop (used by the driver's signal handler)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / REQUEST_FILE).write_text(f"{reason} at {time.time():.0f}\n")


class NodeDrainWatch:
    """Whether a node the job runs on is draining: `draining_nodes` (a GCS query) asked at most every poll_s."""

    def __init__(self, job_nodes: set[str], draining_nodes: Callable[[], set[str]],
                 poll_s: float = DRAIN_POLL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.job_nodes, self.draining_nodes, self.poll_s, self.clock = job_nodes, draining_nodes, poll_s, clock
        self.last_poll = clock()
        self.draining: set[str] = set()

    def check(self) -> bool:
        """Cheap between polls (one clock read); a failed query counts as no drain, asked again next time."""
        now = self.clock()
        if not self.draining and now - self.last_poll >= self.poll_s:
            self.last_poll = now
            try:
                self.draining = self.job_nodes & self.draining_nodes()
            except Exception:  # the GCS busy or restarting: the step goes on
                self.draining = set()
        return bool(self.draining)


def ray_node_drain_watch(world: World) -> NodeDrainWatch | None:
    """Rank 0 watches the nodes of every rank (collective: gathers each rank's Ray node id); others None."""
    import ray

    mine = ray.get_runtime_context().get_node_id()
    nodes = [mine] * world.world_size
    if world.world_size > 1:
        dist.all_gather_object(nodes, mine)
    if not world.is_main:
        return None
    gcs = ray._private.worker.global_worker.gcs_client
    return NodeDrainWatch(set(nodes), lambda: set(gcs.get_draining_nodes(timeout=5)))


class PreemptionWatch:
    def __init__(self, run_dir: Path, world: World, drain: NodeDrainWatch | None = None) -> None:
        self.request_file = run_dir / REQUEST_FILE
        self.world = world
        self.drain = drain
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

    def should_stop(self) -> str | None:
        """Collective: on every rank, why to stop when any rank saw a request (NODE_DRAINING when the only
        request is a drain), else None."""
        requested = self.signalled is not None or self.request_file.exists()
        draining = self.drain is not None and self.drain.check()
        local = 2 if requested else int(draining)  # a signal or file outranks a drain: the driver itself stops
        if self.world.world_size > 1:
            flag = torch.tensor([local], device=self.world.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        return {0: None, 1: NODE_DRAINING, 2: "request"}[local]
