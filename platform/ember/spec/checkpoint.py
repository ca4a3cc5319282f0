"""Checkpoint section."""

from __future__ import annotations

from pydantic import Field

from ember.spec.base import Section


class CheckpointSpec(Section):
    every_n_steps: int = Field(100, ge=1, description="Save every N steps (and at the end).")
    keep_last: int = Field(3, ge=1, description="Newest committed checkpoints kept; older ones go after a commit.")
    keep_every: int = Field(0, ge=0, description="Also keep checkpoints whose step is a multiple of this (0: none).")
    async_save: bool = Field(True, description="Stage in host memory, write to disk on a background thread.")
    verify_checksums: bool = Field(True, description="Check every file's sha256 before resuming (sizes always).")
    resume: str = Field(
        "auto",
        description="auto = continue from the newest valid checkpoint of the run; never; or a checkpoint folder.",
    )
    allow_spec_change: list[str] = Field(
        [],
        description="Spec fields (dotted, e.g. model.n_heads) a resume may change although they change what the model "
        "computes; without them such a resume is refused.",
    )
