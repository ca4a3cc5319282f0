"""Checkpoint section."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from ember.spec.base import Section
from ember.spec.messages import did_you_mean

RESUME_MODES = ("auto", "never")


class CheckpointSpec(Section):
    every_n_steps: int = Field(100, ge=1, description="Save every N steps (and at the end).")
    keep_last: int = Field(3, ge=1, description="Newest committed checkpoints kept; older ones go after a commit.")
    keep_every: int = Field(0, ge=0, description="Also keep checkpoints whose step is a multiple of this (0: none).")
    async_save: bool = Field(True, description="Stage in host memory, write to disk on a background thread.")
    verify_checksums: bool = Field(True, description="Check every file's sha256 before resuming (sizes always).")
    resume: str | int = Field(
        "auto",
        description="auto = continue from the newest valid checkpoint of the run; never; a step number (the run's "
        "own checkpoint of that step); or a checkpoint folder (a path with a /, relative to the spec file).",
    )
    allow_spec_change: list[str] = Field(
        [],
        description="Spec fields (dotted, e.g. model.n_heads) a resume may change although they change what the model "
        "computes; without them such a resume is refused.",
    )

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_target(cls, value: object) -> str | int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        if isinstance(value, str) and (value in RESUME_MODES or "/" in value):
            return value
        hint = did_you_mean(value, list(RESUME_MODES)) if isinstance(value, str) else ""
        raise ValueError(
            f"{value!r}: use auto, never, a step number (e.g. 200) or a checkpoint folder path with a / "
            f"(e.g. runs/NAME/checkpoints/step_000200){hint}"
        )

    def resume_folder(self, checkpoints: Path) -> Path:
        """The folder an explicit resume (a step number or a path) names; `checkpoints` holds the run's own."""
        if isinstance(self.resume, int):
            return checkpoints / f"step_{self.resume:06d}"
        return Path(self.resume)
