"""`ember resume`: continue a run from its folder, optionally on another number of workers.

`--check` only says what would happen: which checkpoint, how the spec differs from the one that saved
it, and whether the engine state is resharded for a new world size. A change of a field that changes what
the model computes (shape, MoE routing, data sources) is refused - here and in every resume of a run -
unless `checkpoint.allow_spec_change` (`--allow-spec-change`) names it: tensors of the same shape would
load without a word into a different function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.checkpoint.manager import CheckpointManager
from ember.checkpoint.manifest import read_manifest
from ember.errors import UserError
from ember.spec import JobSpec

# Fields whose change continues another function from the saved weights (everything under them counts) ...
FUNCTION_FIELDS = ("model", "data.train", "data.sources", "data.decode", "data.image_tokens")
# ... except these: a layout the engine reshards on load, or knobs of memory use, evaluation and sampling.
HARMLESS_FIELDS = (
    "model.moe.ep_size", "model.activation_checkpointing", "model.moe.eval_capacity_factor", "model.sampler",
    "model.sample_steps", "model.guidance",
)


@dataclass
class ResumePlan:
    spec: JobSpec
    checkpoint: Path | None
    step: int
    saved_world_size: int | None
    skipped: list[tuple[Path, list[str]]]
    spec_changes: list[str]
    refused: list[str]  # dotted fields whose change the resume refuses

    @property
    def reshards(self) -> bool:
        return self.saved_world_size is not None and self.saved_world_size != self.spec.cluster.num_workers

    def describe(self) -> str:
        lines = [f"run folder: {self.spec.output_dir}"]
        lines += [f"skipping {folder.name}: {problems[0]}" for folder, problems in self.skipped]
        if self.checkpoint is None:
            lines.append("no valid checkpoint: training starts from step 0")
        else:
            saved = f"saved by {self.saved_world_size} workers"
            lines.append(f"checkpoint: {self.checkpoint.name} (step {self.step}), {saved}")
        world = self.spec.cluster.num_workers
        if self.reshards:
            lines.append(
                f"world size {self.saved_world_size} -> {world}: the engine reshards its state on load "
                "(or stops with a clear error if its format cannot be resharded)"
            )
        else:
            lines.append(f"world size {world}: unchanged")
        lines += [f"spec change: {change}" for change in self.spec_changes] or ["spec: unchanged"]
        lines += [f"refused: {field} changes what the model computes; --allow-spec-change {field} accepts it"
                  for field in self.refused]
        return "\n".join(lines)


def plan_resume(run_dir: Path, world_size: int | None = None, overrides: list[str] | None = None) -> ResumePlan:
    spec_file = run_dir / "spec.yaml"
    if not spec_file.is_file():
        raise UserError(f"{run_dir}: not a run folder (no spec.yaml); pass runs/<name>")
    extra = list(overrides or []) + [f"run_dir={run_dir.absolute()}", "checkpoint.resume=auto"]
    if world_size is not None:
        saved = JobSpec.load(spec_file, extra)
        extra += [f"cluster.num_workers={world_size}", *keep_global_batch(saved, world_size)]
        extra += fit_expert_parallelism(saved, world_size)
    spec = JobSpec.load(spec_file, extra)
    manager = CheckpointManager(run_dir / "checkpoints", world=None)
    found = manager.latest_valid(checksums=spec.checkpoint.verify_checksums)
    manifest = read_manifest(found) if found else None
    saved_spec = manifest.get("spec", {}) if manifest else {}
    return ResumePlan(
        spec=spec, checkpoint=found, step=manifest["step"] if manifest else 0,
        saved_world_size=manifest["world_size"] if manifest else None, skipped=manager.skipped,
        spec_changes=diff_specs(saved_spec, spec.model_dump(mode="json")), refused=refused_changes(saved_spec, spec),
    )


def refused_changes(saved_spec: dict[str, Any], spec: JobSpec) -> list[str]:
    """Fields that change what the model computes, changed since the checkpoint and not allowed by the spec."""
    allowed = spec.checkpoint.allow_spec_change
    changed = [path for path, _, _ in spec_differences(saved_spec, spec.model_dump(mode="json"))] if saved_spec else []
    return [path for path in changed if under(path, FUNCTION_FIELDS) and not under(path, (*HARMLESS_FIELDS, *allowed))]


def under(path: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(path == prefix or path.startswith(prefix + ".") for prefix in prefixes)


def check_spec_compatible(checkpoint: Path, saved_spec: dict[str, Any], spec: JobSpec) -> None:
    """Refuse (UserError) a resume whose spec changed a field that changes what the model computes."""
    refused = refused_changes(saved_spec, spec)
    if refused:
        raise UserError(
            f"{checkpoint}: the spec changed {', '.join(refused)} since this checkpoint was saved; that changes what "
            "the model computes, so the weights would load into another function. Undo the change, use a new "
            f"run_dir, or accept it with `ember resume --allow-spec-change {refused[0]}` "
            f"(spec: checkpoint.allow_spec_change=[{refused[0]}])"
        )


def keep_global_batch(spec: JobSpec, world_size: int) -> list[str]:
    """Overrides that keep the global batch (so the optimisation is the same) on a new world size:
    the smallest gradient accumulation whose micro-batch is no larger than the saved one."""
    total, micro = spec.global_batch, spec.schedule.micro_batch
    for accumulation in range(1, total + 1):
        if total % (accumulation * world_size) == 0 and total // (accumulation * world_size) <= micro:
            return [f"schedule.micro_batch={total // (accumulation * world_size)}", f"schedule.global_batch={total}"]
    raise UserError(f"global batch {total} cannot be split over {world_size} workers; pick a divisor of {total}")


def fit_expert_parallelism(spec: JobSpec, world_size: int) -> list[str]:
    """The largest EP size, no larger than the saved one, that divides both the experts and the workers."""
    moe = spec.model.moe
    if moe is None or world_size % moe.ep_size == 0:
        return []
    fits = [size for size in range(moe.ep_size, 0, -1)
            if world_size % size == 0 and all(count % size == 0 for count in moe.expert_counts)]
    return [f"model.moe.ep_size={fits[0]}"]


def diff_specs(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Dotted paths whose values differ, as 'path: old -> new'."""
    return [f"{path}: {old!r} -> {new!r}" for path, old, new in spec_differences(before, after)]


def spec_differences(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, old, new) of every leaf that differs."""
    changes = []
    for key in sorted(set(before) | set(after)):
        path, old, new = f"{prefix}{key}", before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += spec_differences(old, new, f"{path}.")
        elif old != new:
            changes.append((path, old, new))
    return changes
