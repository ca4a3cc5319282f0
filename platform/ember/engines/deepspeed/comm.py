"""DeepSpeed's communication backend on top of the torch process group ember has already started, and
DeepSpeed started without compiling or importing compilers it does not use.

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

import importlib
import sys

SHARED_MEMORY_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME (deepspeed/ops/op_builder/cpu/comm.py)


def init_deepspeed_comm(backend: str) -> None:
    """deepspeed.init_distributed over the existing torch process group, compiling nothing."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHARED_MEMORY_OP] = False  # read by deepspeed.comm.torch.build_shm_op
    deepspeed.init_distributed(dist_backend=backend)  # adopts the existing torch process group


# DeepSpeed's ZeRO check (`is_zero_supported_optimizer`, run by every deepspeed.initialize with ZeRO on) imports its
# Muon optimizer to add it to the list of supported ones, whatever optimizer it was given. That module decorates
# three functions with `torch.compile`, and torch.compile under the default backend builds inductor's wrapper at
# decoration time, which imports inductor's compiler: 181 modules, 1.1-1.7 CPU s per rank (bench/RESULTS.md,
# *Start-up*), in every worker of every run, for an optimizer ember's spec cannot name.
MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_without_inductor() -> None:
    """Import DeepSpeed's Muon module once with torch.compile's default backend set to eager, then put the
    default back: DeepSpeed's own import of it later finds it in sys.modules. Nothing is compiled either way
    until a Muon function is called; with eager, such a call (ember never makes one) would run traced by dynamo
    but not inductor-compiled. torch.compiler.set_default_backend is torch's public API for this."""
    import torch

    if MUON_MODULE in sys.modules:
        return
    previous = torch.compiler.get_default_backend()
    torch.compiler.set_default_backend("eager")
    try:
        importlib.import_module(MUON_MODULE)
    except ImportError:  # a DeepSpeed without Muon: its check skips it the same way
        pass
    finally:
        torch.compiler.set_default_backend(previous)
