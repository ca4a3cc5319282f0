"""DeepSpeed's communication backend starts on ember's process group without compiling anything."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.helpers.distributed import run_on_ranks


def start_deepspeed_comm(rank: int, world_size: int, extensions: str) -> dict[str, Any]:
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions  # where a JIT build of a DeepSpeed op would land
    from deepspeed.comm import comm

    from ember.engines.deepspeed.comm import init_deepspeed_comm
    from ember.world import world_from_env

    init_deepspeed_comm(world_from_env("cpu").backend)
    return {"backend_started": comm.is_initialized(), "shared_memory_op": comm.cdb.shm_comm_op}


def test_deepspeed_comm_starts_without_building_the_shared_memory_op(tmp_path: Path) -> None:
    (result,) = run_on_ranks(start_deepspeed_comm, 1, str(tmp_path), timeout_s=120)
    assert result["backend_started"]
    assert result["shared_memory_op"] is None
    assert list(tmp_path.iterdir()) == []  # deepspeed_shm_comm/ appears here when DeepSpeed compiles it
