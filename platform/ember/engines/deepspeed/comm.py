"""DeepSpeed's communication backend on top of the torch process group ember has already started.

`deepspeed.init_distributed` builds DeepSpeed's TorchBackend, whose constructor JIT-compiles the CPU
shared-memory all-reduce op (`deepspeed_shm_comm`, C++ with OpenMP, ~50 s on 2 cores) into
~/.cache/torch_extensions the first time it runs on a machine: every fresh CI machine or container, with
both ranks waiting on one build. That op serves only `inference_all_reduce` (DeepSpeed's AutoTP layers in
deepspeed/module_inject), which ember never uses; ZeRO's reduce-scatter, all-gather and all-reduce go
through torch.distributed. Without the op, `inference_all_reduce` falls back to torch.distributed's
all_reduce. DeepSpeed 0.19 has no environment variable or config key for this; the op is skipped when its
entry in `deepspeed.ops.__compatible_ops__` is False (a dict cached in the module, which deepspeed says
keeps edits). Building it at install time (DS_BUILD_SHM_COMM=1 pip install deepspeed) would avoid the JIT
build too, but means compiling DeepSpeed from source on every install for an op ember does not call.
"""

from __future__ import annotations

SHARED_MEMORY_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME (deepspeed/ops/op_builder/cpu/comm.py)


def init_deepspeed_comm(backend: str) -> None:
    """deepspeed.init_distributed over the existing torch process group, compiling nothing."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHARED_MEMORY_OP] = False  # read by deepspeed.comm.torch.build_shm_op
    deepspeed.init_distributed(dist_backend=backend)  # adopts the existing torch process group
