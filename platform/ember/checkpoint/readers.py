"""Reading a committed checkpoint outside training: its manifest's job spec and its EMA weights (serving,
evaluation and export all start here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ember.checkpoint.manager import find_checkpoint
from ember.checkpoint.manifest import read_manifest
from ember.errors import UserError
from ember.spec import JobSpec


def read_checkpoint_spec(path: Path, verify: bool = True) -> tuple[Path, dict[str, Any], JobSpec]:
    """(checkpoint folder, manifest, job spec) of a run folder's newest valid checkpoint or a checkpoint folder.

    verify=False: `path` is a checkpoint folder already verified (by `ember serve` before it starts the ranks),
    so that N ranks do not each hash every file of a checkpoint they read only a share of.
    """
    checkpoint = find_checkpoint(Path(path)) if verify else Path(path)
    manifest = read_manifest(checkpoint)
    if manifest is None:
        raise UserError(f"{checkpoint / 'manifest.json'}: missing or unreadable")
    if not isinstance(manifest.get("spec"), dict):
        raise UserError(f"{checkpoint / 'manifest.json'}: has no job spec; it was not written by `ember run`")
    try:
        spec = JobSpec.model_validate(manifest["spec"])
    except ValueError as exc:
        raise UserError(f"{checkpoint / 'manifest.json'}: its job spec does not validate: {exc}") from None
    return checkpoint, manifest, spec


def load_ema(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    """The EMA copy of network `name` ("model", "generator") that the image families sample from."""
    path = checkpoint / "engine" / "ema.pt"
    if not path.is_file():
        raise UserError(f"{checkpoint}: no ema.pt; was this run trained by an ember with EMA support?")
    return torch.load(path, map_location="cpu", weights_only=False)[name]["module"]
