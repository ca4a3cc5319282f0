"""Engine section: a discriminated union on `kind`; each engine keeps only the switches it understands."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ember.spec.base import Section, tagged_union

Precision = Literal["fp32", "bf16", "fp16"]


class _EngineCommon(Section):
    precision: Precision = Field(
        "fp32", description="Compute precision: fp32, bf16 (autocast / DeepSpeed bf16) or fp16."
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this value; null disables."
    )


class DeepSpeedSpec(_EngineCommon):
    kind: Literal["deepspeed"] = Field("deepspeed", description="Train with DeepSpeed.")
    zero_stage: int = Field(
        2, ge=0, le=3, description="ZeRO stage 0-3 (what is partitioned: nothing, optimizer, +grads, +params)."
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Offload optimizer state (ZeRO >= 1)."
    )
    offload_param: Literal["none", "cpu", "nvme"] = Field("none", description="Offload parameters (ZeRO-3 only).")
    nvme_path: str | None = Field(None, description="Local NVMe folder for nvme offload.")
    overlap_comm: bool = Field(False, description="Overlap gradient reduction with backward (helps on GPUs).")
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Raw DeepSpeed config keys merged last, for switches ember does not model."
    )

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedSpec:
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3")
        if "nvme" in (self.offload_optimizer, self.offload_param) and not self.nvme_path:
            raise ValueError("nvme offload needs nvme_path")
        return self


class DDPSpec(_EngineCommon):
    kind: Literal["ddp"] = Field("ddp", description="PyTorch DistributedDataParallel.")


class FSDPSpec(_EngineCommon):
    kind: Literal["fsdp"] = Field("fsdp", description="PyTorch FSDP2 (fully_shard) per transformer block.")
    reshard_after_forward: bool = Field(True, description="Free gathered parameters after forward (ZeRO-3 like).")


class FairscaleSpec(_EngineCommon):
    kind: Literal["fairscale"] = Field("fairscale", description="fairscale engines.")
    mode: Literal["sharded_ddp", "fsdp"] = Field(
        "sharded_ddp",
        description="sharded_ddp = OSS optimizer sharding + ShardedDDP; fsdp = fairscale FSDP (CUDA only).",
    )


EngineSpec = tagged_union("kind", "deepspeed", DeepSpeedSpec, DDPSpec, FSDPSpec, FairscaleSpec)
