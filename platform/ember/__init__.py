"""ember: train and serve large generative models on a Ray cluster from one job spec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ember.errors import InternalError, UserError
from ember.spec import JobSpec

__version__ = "0.1.0"
__all__ = ["JobSpec", "UserError", "InternalError", "run"]

if TYPE_CHECKING:
    from ember.train.launch import RunResult


def run(spec: JobSpec | str, overrides: list[str] | None = None, **kwargs: Any) -> RunResult:
    """Train a job (spec object or YAML path); returns the run folder and final metrics."""
    from ember.train.launch import run_job

    if not isinstance(spec, JobSpec):
        spec = JobSpec.load(spec, overrides)
    return run_job(spec, **kwargs)
