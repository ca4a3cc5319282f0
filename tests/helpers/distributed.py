"""Run a function on N gloo ranks (spawned processes on this machine) and collect what each rank returns.

    results = run_on_ranks(train_one_engine, 2, spec_dict)   # [rank0_result, rank1_result]

The function gets (rank, world_size, *args) with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
set, so `ember.world.world_from_env("cpu")` starts the process group. It must be importable by name
(a module-level function), because ranks start fresh interpreters. Results travel through files, not
pipes, so large return values cannot deadlock the join.
"""

from __future__ import annotations

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
            args=(fn, world_size, port, folder, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"ranks still running after {timeout_s:.0f} s")
        return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _rank_main(rank: int, fn: Callable[..., Any], world_size: int, port: int, folder: str, args: tuple) -> None:
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
