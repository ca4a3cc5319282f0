"""Checkpoint section."""

from __future__ import annotations

from pydantic import Field

from ember.spec.base import Section


class CheckpointSpec(Section):
    every_n_steps: int = Field(100, ge=1, description="Save every N steps (and at the end).")
    keep_last: int = Field(
        3, ge=1, description="Committed checkpoints kept; older ones are deleted after a new commit."
    )
    resume: str = Field(
        "auto",
        description="auto = continue from the newest valid checkpoint of the run; never; or a checkpoint folder.",
    )
