"""A checkpoint's full module weights, read from the files its engine wrote (for export, eval and serving)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ember.checkpoint.io import load_file


def full_state_dict(engine_dir: Path, spec) -> dict[str, torch.Tensor]:
    """spec: the JobSpec that trained the checkpoint (its engine section says whose files these are)."""
    kind = spec.engine.kind
    if kind == "deepspeed":
        from ember.engines.deepspeed.layout import full_weights

        return full_weights(engine_dir, spec)
    if kind == "fsdp":
        return _dcp_state_dict(engine_dir)
    return _torch_load(engine_dir / "model.pt")  # ddp and fairscale write the full module on rank 0


def _dcp_state_dict(engine_dir: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "full.pt"
        dcp_to_torch_save(str(engine_dir), str(target))
        return _torch_load(target)["model"]


def _torch_load(path: Path):
    return load_file(path, "the checkpoint; it cannot be exported")
