"""Cluster section: where Ray runs and what each training worker gets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ember.spec.base import Section


class ClusterSpec(Section):
    address: str = Field(
        "local", description="local (embedded Ray), auto (the running cluster), ray://HOST:10001 or http://HOST:8265."
    )
    num_workers: int = Field(2, ge=1, description="Training workers (ranks); one per GPU on GPU clusters.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when workers see a GPU.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker (also its torch thread count).")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources per worker, e.g. {accelerator_type:H100: 0.01}."
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts after a failure (-1 = unlimited); a user error, or the same "
        "failure again at the same step, is never retried.",
    )

    @field_validator("address")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value in ("local", "auto") or value.startswith(("ray://", "http://", "https://")):
            return value
        raise ValueError("must be local, auto, ray://HOST:PORT or http(s)://HOST:PORT")
