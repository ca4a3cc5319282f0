"""DeepSpeed: ZeRO 0-3, CPU/NVMe offload, bf16/fp16, and expert-parallel MoE.

`deepspeed_config(spec)` is a pure function of the job spec (`ember show` prints it). The engine hands
DeepSpeed ember's own torch optimizer and LR schedule, so every engine trains the same arithmetic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ember.checkpoint.io import save_file
from ember.engines.base import ENGINES
from ember.engines.deepspeed.comm import import_muon_without_inductor, init_deepspeed_comm
from ember.engines.deepspeed.moe import expose_to_deepspeed
from ember.engines.optim import build_optimizer, build_scheduler
from ember.errors import UserError
from ember.models.layers.moe import is_expert_parameter
from ember.world import World

BUCKET_ELEMENTS = 50_000_000  # 200 MB of fp32 per reduce/all-gather bucket: large messages, bounded memory


def deepspeed_config(spec) -> dict[str, Any]:
    """The DeepSpeed config a JobSpec turns into; `engine.config_overrides` is merged in last."""
    engine = spec.engine
    config = {
        "train_micro_batch_size_per_gpu": spec.schedule.micro_batch,
        "gradient_accumulation_steps": spec.grad_accumulation,
        "train_batch_size": spec.global_batch,
        "zero_optimization": _zero_section(engine),
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16"},
        "gradient_clipping": engine.grad_clip if engine.grad_clip is not None else 0.0,
        "zero_allow_untested_optimizer": True,  # ember passes its own torch optimizer
        "steps_per_print": 2**31 - 1,  # ember reports progress itself
        "wall_clock_breakdown": False,
    }
    if engine.offload_optimizer != "none":
        config["zero_force_ds_cpu_optimizer"] = False  # keep ember's torch optimizer for offloaded state
    return deep_merge(config, engine.config_overrides)


def _zero_section(engine) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": engine.zero_stage,
        "overlap_comm": engine.overlap_comm,
        "contiguous_gradients": True,  # DeepSpeed's MoE support asserts it for stage 2
        "reduce_scatter": True,
        "reduce_bucket_size": BUCKET_ELEMENTS,
        "allgather_bucket_size": BUCKET_ELEMENTS,
    }
    if engine.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(engine.offload_optimizer, engine.nvme_path)
    if engine.offload_param != "none":
        zero["offload_param"] = _offload(engine.offload_param, engine.nvme_path)
    return zero


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    return {"device": device, "nvme_path": nvme_path} if device == "nvme" else {"device": device}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A new dict: nested dicts merge key by key, anything else in `override` replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class DeepSpeedEngine:
    @property
    def reshards_on_load(self) -> bool:
        """DeepSpeed's own load refuses another world size; ember converts ZeRO 0-2 checkpoints (reshard.py)."""
        from ember.engines.deepspeed.reshard import reshard_problem

        return reshard_problem(self.ds) is None

    @property
    def reshard_refusal(self) -> str | None:
        """Why this engine's checkpoints cannot load on another world size (None: they can)."""
        from ember.engines.deepspeed.reshard import reshard_problem

        return reshard_problem(self.ds)

    def __init__(self, ds, world: World) -> None:
        self.ds, self.world = ds, world
        self.module: nn.Module = ds.module
        # ZeRO and the bf16/fp16 optimizers measure the norm; a plain torch optimizer at stage 0 does not.
        self.measures_norm = not hasattr(ds.optimizer, "_global_grad_norm")

    @property
    def is_moe_aware(self) -> bool:
        return True

    def forward(self, *args: Any) -> Any:
        return self.ds(*args)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # scales by 1/accumulation and reduces on the boundary micro-batch
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # DeepSpeed counts micro-steps in step(); it only updates on the boundary

    def step(self) -> float:
        # Measured here: the true norm, also under expert parallelism, where DeepSpeed's stage-0 clipping
        # uses the mean of per-rank norms instead (each rank sees only its own experts).
        measured = global_grad_norm(self.module) if self.measures_norm else None
        self.ds.step()
        if measured is not None:
            return measured
        reported = self.ds.get_global_grad_norm()
        return float("nan") if reported is None else float(reported)  # None: compute_grad_norm overridden off

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def save(self, folder: Path) -> None:
        self.ds.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        from ember.engines.deepspeed.reshard import load_resharded, saved_layout

        saved = saved_layout(folder)
        if not saved.matches(self.world, self.ds.zero_optimization_stage()):
            load_resharded(self.ds, folder, self.world, saved)  # another world size, ep_size or ZeRO stage
            return
        path, _ = self.ds.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint to load")


def global_grad_norm(module: nn.Module) -> float:
    """L2 norm of all gradients after reduction: dense ones once, each expert's from the rank holding it."""
    dense = [p.grad for p in module.parameters() if p.grad is not None and not is_expert_parameter(p)]
    experts = [p for p in module.parameters() if p.grad is not None and is_expert_parameter(p)]
    squares = torch.nn.utils.get_total_norm(dense).double() ** 2 if dense else torch.zeros((), dtype=torch.float64)
    if experts:
        from deepspeed.utils import groups

        expert_squares = torch.nn.utils.get_total_norm([p.grad for p in experts]).double() ** 2
        # Replicas of an expert hold the same gradient; the expert-parallel group holds distinct experts.
        dist.all_reduce(expert_squares, group=groups._get_expert_parallel_group(experts[0].group_name))
        squares = squares + expert_squares.to(squares.device)
    return float(squares.sqrt())


def name_expert_groups(optimizer: torch.optim.Optimizer) -> None:
    """ZeRO finds an expert group's process group by the group's `name`: DeepSpeed's group name (ep_size_N)."""
    for group in optimizer.param_groups:
        if group.get("moe"):
            names = {param.group_name for param in group["params"]}
            if len(names) != 1:
                raise ValueError(f"optimizer group {group['name']!r} mixes expert groups {sorted(names)}")
            group["name"] = names.pop()


@ENGINES.register("deepspeed")
def build_deepspeed_engine(spec, model: nn.Module, world: World) -> DeepSpeedEngine:
    if spec.engine.precision == "fp16" and world.device.type != "cuda":
        raise UserError("engine.precision=fp16 needs a GPU (DeepSpeed's fp16 loss scaling); use bf16 or fp32 on CPU")
    import deepspeed

    init_deepspeed_comm(world.backend)
    import_muon_without_inductor()
    expose_to_deepspeed(model)  # ember's MoE layers: ZeRO's expert groups and per-expert checkpoint files
    offloads = spec.engine.offload_optimizer != "none"
    optimizer = build_optimizer(model, spec.optim, fused=world.device.type == "cuda" and not offloads)
    name_expert_groups(optimizer)
    scheduler = build_scheduler(optimizer, spec.optim, spec.schedule.steps)
    ds, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(spec)
    )
    ds.checkpoint_engine = ember_checkpoint_engine(ds.checkpoint_engine)
    return DeepSpeedEngine(ds, world)


def ember_checkpoint_engine(default):
    """DeepSpeed's torch checkpoint engine, writing through ember's save_file (deferrable for async save)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(default) is not TorchCheckpointEngine:
        return default  # a user-configured engine (Nebula, decoupled, ...) keeps its own I/O

    class EmberCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str) -> None:
            save_file(state_dict, Path(path))

    engine = EmberCheckpointEngine.__new__(EmberCheckpointEngine)
    engine.__dict__.update(default.__dict__)
    return engine
