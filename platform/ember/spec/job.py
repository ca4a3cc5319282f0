"""JobSpec: the one document a user writes. Loading it validates everything that can be checked up front."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from ember.errors import UserError
from ember.spec.base import Section
from ember.spec.checkpoint import RESUME_MODES, CheckpointSpec
from ember.spec.cluster import ClusterSpec
from ember.spec.data import DataSpec
from ember.spec.engine import DDPSpec, DeepSpeedSpec, EngineSpec, FairscaleSpec
from ember.spec.logging import LoggingSpec
from ember.spec.messages import format_validation_error
from ember.spec.model import ModelSpec
from ember.spec.optim import OptimSpec, ScheduleSpec
from ember.spec.overrides import apply_overrides
from ember.spec.paths import missing_local_shards, resolve_input_paths


class JobSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name; outputs go to runs/<name>.")
    run_dir: str | None = Field(
        None, description="Output folder (checkpoints, TensorBoard); default runs/<name> under the current folder."
    )
    model: ModelSpec = Field(description="What to train.")
    data: DataSpec = Field(description="Where the shards are.")
    engine: EngineSpec = Field(default_factory=DeepSpeedSpec, description="How to distribute training.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer and learning-rate schedule.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Steps and batch sizes.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="When to save and how to resume.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Where to run.")
    logging: LoggingSpec = Field(default_factory=LoggingSpec, description="Console and TensorBoard.")

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        workers, micro = self.cluster.num_workers, self.schedule.micro_batch
        if self.schedule.global_batch is not None and self.schedule.global_batch % (micro * workers):
            raise ValueError(
                f"schedule.global_batch={self.schedule.global_batch} must be micro_batch ({micro}) x gradient "
                f"accumulation x data-parallel size ({workers} workers); make it a multiple of {micro * workers}"
            )
        moe = self.model.moe
        if moe is not None:
            if workers % moe.ep_size:
                raise ValueError(f"model.moe.ep_size={moe.ep_size} must divide cluster.num_workers={workers}")
            if isinstance(self.engine, DeepSpeedSpec) and self.engine.zero_stage == 3:
                raise ValueError("MoE with engine.zero_stage=3 is not supported by DeepSpeed; use zero_stage 0, 1 or 2")
            ddp_with_ember = isinstance(self.engine, DDPSpec) and moe.impl == "ember"
            if not isinstance(self.engine, DeepSpeedSpec) and not ddp_with_ember and moe.ep_size > 1:
                raise ValueError(
                    f"model.moe.ep_size={moe.ep_size} needs engine.kind=deepspeed, or ddp with model.moe.impl: ember "
                    "(they reduce expert gradients over expert-data-parallel groups); other engines support MoE "
                    "with ep_size 1"
                )
        if isinstance(self.engine, FairscaleSpec) and self.engine.mode == "fsdp" and self.cluster.device == "cpu":
            raise ValueError(
                "engine.mode=fsdp: fairscale's FSDP asserts CUDA; use mode sharded_ddp or engine.kind=fsdp on CPU"
            )
        if self.engine.precision == "fp16" and not isinstance(self.engine, DeepSpeedSpec):
            raise ValueError("engine.precision=fp16 needs engine.kind=deepspeed (loss scaling); use bf16 instead")
        check_image_family(self)
        check_engine_overrides(self)
        return self

    def check_local_inputs(self) -> None:
        """Local shards and an explicit resume folder must exist, unless data.build makes the shards. A spec for
        another cluster (cluster.address not local) names paths on that cluster: its own run checks them."""
        if self.cluster.address != "local":
            return
        problems = [] if self.data.build is not None else missing_by_field(missing_local_shards(self.data))
        resume = self.checkpoint.resume
        if resume not in RESUME_MODES:
            folder = self.checkpoint.resume_folder(self.output_dir / "checkpoints")
            if not (folder / "manifest.json").is_file():
                problems.append(f"checkpoint.resume: {folder} is not a committed checkpoint (no manifest.json)")
        if problems:
            raise UserError("\n".join(problems))

    # Derived quantities: the single place the batch arithmetic lives.
    @property
    def grad_accumulation(self) -> int:
        per_step = self.schedule.micro_batch * self.cluster.num_workers
        return (self.schedule.global_batch or per_step) // per_step

    @property
    def global_batch(self) -> int:
        return self.schedule.micro_batch * self.cluster.num_workers * self.grad_accumulation

    @property
    def output_dir(self) -> Path:
        return Path(self.run_dir or Path("runs") / self.name).absolute()

    def fingerprint(self) -> str:
        """Hash of the resolved spec, recorded with checkpoints."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> JobSpec:
        """Read, override, resolve paths and validate a spec file, or raise one UserError naming the problem."""
        path = Path(path)
        raw = _read_yaml(path)
        raw = apply_overrides(raw, overrides or [])
        raw = resolve_input_paths(raw, path.parent.absolute())
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "spec") -> JobSpec:
        try:
            spec = cls.model_validate(raw)
        except ValidationError as err:
            raise UserError(format_validation_error(err, cls, source)) from None
        if spec.run_dir is not None:
            spec.run_dir = str(Path(spec.run_dir).absolute())
        return spec


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: spec file not found; pass the path of a job YAML (see jobs/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise UserError(f"{path}:{line}: not valid YAML: {getattr(err, 'problem', err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the spec: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a job spec is a YAML mapping (name:, model:, data:, ...), got {type(raw).__name__}")
    return raw


def check_image_family(spec: JobSpec) -> None:
    """Diffusion and GAN read float images; a GAN's two engines cannot be ZeRO-3 (D's weights must be whole
    while G trains through it)."""
    family = spec.model.family
    if family == "gpt":
        if spec.data.decode == "image":
            raise ValueError("data.decode: image gives float images, a GPT reads tokens; use text or image_tokens")
        return
    if spec.data.decode != "image":
        raise ValueError(f"model.family={family} reads images: set data.decode=image")
    if family == "gan":
        for name in ("generator", "discriminator"):
            engine = getattr(spec.model, name).engine or spec.engine
            if isinstance(engine, DeepSpeedSpec) and engine.zero_stage == 3:
                raise ValueError(f"model.{name}.engine: zero_stage 3 is not supported for a GAN; use 0, 1 or 2")


# DeepSpeed keys a typed field owns: set there, they are checked (MoE + ZeRO-3, offload needs ZeRO); set in
# config_overrides, they would bypass those checks.
OWNED_DEEPSPEED_KEYS = {
    ("train_micro_batch_size_per_gpu",): "schedule.micro_batch",
    ("gradient_accumulation_steps",): "schedule.global_batch",
    ("train_batch_size",): "schedule.global_batch",
    ("zero_optimization", "stage"): "engine.zero_stage",
    ("zero_optimization", "offload_optimizer"): "engine.offload_optimizer",
    ("zero_optimization", "offload_param"): "engine.offload_param",
    ("zero_optimization", "overlap_comm"): "engine.overlap_comm",
    ("bf16",): "engine.precision",
    ("fp16",): "engine.precision",
    ("gradient_clipping",): "engine.grad_clip",
}


def check_engine_overrides(spec: JobSpec) -> None:
    engines = {"engine": spec.engine}
    if spec.model.family == "gan":
        engines |= {f"model.{name}.engine": getattr(spec.model, name).engine for name in ("generator", "discriminator")}
    for field, engine in engines.items():
        overrides = engine.config_overrides if isinstance(engine, DeepSpeedSpec) else {}
        for keys, owner in OWNED_DEEPSPEED_KEYS.items():
            node = overrides
            for key in keys:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            if node != {}:
                raise ValueError(
                    f"{field}.config_overrides.{'.'.join(keys)}: set {owner} instead (ember checks it against the "
                    "model; an override would bypass that)"
                )


def missing_by_field(missing: list[tuple[str, str]]) -> list[str]:
    """One line per shard field: how many of its files are missing, and the first few."""
    lines = []
    for field in dict.fromkeys(field for field, _ in missing):
        urls = [url for owner, url in missing if owner == field]
        shown = ", ".join(urls[:3]) + (f" and {len(urls) - 3} more" if len(urls) > 3 else "")
        lines.append(
            f"{field}: {len(urls)} shard file(s) not found: {shown}; build them (`ember data build text|images "
            "--out DIR`), add a data.build section, or fix the path"
        )
    return lines

