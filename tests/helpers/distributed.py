"""Run a function on N gloo ranks (processes on this machine) and collect what each rank returns.

    results = run_on_ranks(train_one_engine, 2, spec_dict)   # [rank0_result, rank1_result]

The function gets (rank, world_size, *args) with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
set, so `ember.world.world_from_env("cpu")` starts the process group. It must be importable by name
(a module-level function). Results travel through files, not pipes, so large return values cannot deadlock
the join.

Ranks are forked from one forkserver per test session that imported torch, DeepSpeed and ember's training
modules once (FORKSERVER_PRELOAD), instead of each rank spending ~2 CPU s importing them in a fresh
interpreter. A forkserver child inherits the server's environment, not the test's: each rank is handed the
test's environment when it starts.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Imported once in the forkserver, before it forks any rank; what most ranks of the suite import. A test module
# whose ranks import more adds it with `preload_in_forkserver` at import (the server starts at the first rank).
FORKSERVER_PRELOAD = ["torch", "deepspeed", "ember.engines.deepspeed", "ember.engines.ddp", "ember.models",
                      "ember.train.loop", "ember.checkpoint.manager", "ember.data.stream", __name__]
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(FORKSERVER_PRELOAD)


def preload_in_forkserver(*modules: str) -> None:
    FORKSERVER_PRELOAD.extend(module for module in modules if module not in FORKSERVER_PRELOAD)
    FORKSERVER.set_forkserver_preload(FORKSERVER_PRELOAD)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600) -> list[Any]:
    """Spawn `world_size` ranks running fn(rank, world_size, *args); return their results in rank order.

    A failing rank raises here with the child's traceback (torch.multiprocessing.ProcessRaisedException).
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ember-ranks-") as folder:
        context = mp.start_processes(
            _rank_main,
            args=(fn, world_size, port, folder, args, dict(os.environ)),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"ranks still running after {timeout_s:.0f} s")
        return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _rank_main(rank: int, fn: Callable[..., Any], world_size: int, port: int, folder: str, args: tuple,
               environ: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environ)  # the test's, not the forkserver's
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
