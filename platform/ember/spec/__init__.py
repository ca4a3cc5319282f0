"""The job spec: pydantic models, one per section, validated at load."""

from ember.spec.job import JobSpec

__all__ = ["JobSpec"]
