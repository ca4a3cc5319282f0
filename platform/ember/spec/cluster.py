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
    peak_tflops: float | None = Field(
        None, gt=0, description="Peak TFLOP/s of one worker's device for MFU; default: a table of known GPUs, "
        "else a short matmul probe.",
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts after a failure (-1 = unlimited); a user error, or the same "
        "failure again at the same step, is never retried.",
    )
    shared_dirs: list[str] = Field(
        default_factory=list,
        description="Absolute folders every cluster host mounts at the same path (NFS, Lustre). Submitting from "
        "outside the cluster, run_dir, local shard paths and data.build.out must lie under one of them.",
    )

    @field_validator("shared_dirs")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        relative = [folder for folder in value if not folder.startswith("/")]
        if relative:
            raise ValueError(f"must be absolute paths (the same on every host), got {relative}")
        return value

    @field_validator("address")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value in ("local", "auto") or value.startswith(("ray://", "http://", "https://")):
            return value
        raise ValueError("must be local, auto, ray://HOST:PORT or http(s)://HOST:PORT")
