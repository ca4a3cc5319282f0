"""Resume a DeepSpeed checkpoint on another world size or EP size, converted online at load time.

DeepSpeed 0.19.8's `load_checkpoint` refuses a new data-parallel size, and its universal-checkpoint route
mixes up experts under expert parallelism, so ember reshards ZeRO 0-2 checkpoints itself (fp32; bf16 at
ZeRO-1/2, whose shards DeepSpeed names bf16_zero_pp_rank_*):

    saved_layout(engine_dir)                     world size, EP size and ZeRO stage that wrote the files
    read_full_state(engine_dir, saved, experts)  files -> full tensors by name, experts under global ids
    load_full_state(ds, full, experts, world)    full tensors -> this rank's module, fp32 partitions, moments

`load_resharded` runs the last two; DeepSpeedEngine.load calls it when the saved layout is not this one.
ember's MoE layer holds a rank's experts stacked (`experts.w_in` [E_local, d, d_ff], ...): its weights are
saved one file per expert like DeepSpeed's, and its optimizer tensors are split into the same per-expert
global names when read, and stacked again for the loading rank's experts.

What DeepSpeed writes (ZeRO-1/2): `mp_rank_00_model_states.pt` (dp rank 0: the module without experts,
`param_shapes`, LR scheduler, step counters); `layer_L_expert_E_mp_rank_00_model_states.pt` (expert
weights under global expert ids); per rank `zero_pp_rank_R_mp_rank_00_optim_states.pt` holding, per
optimizer group, the flat fp32 partition (`single_partition_of_fp32_groups`, group padding cut), the torch
optimizer state of that flat tensor (`base_optimizer_state`) and `param_slice_mappings` (name -> start and
numel of the parameter's fragment in the partition; expert names are local to the saving EP rank). Dense
groups are partitioned over all ranks, expert groups over their expert-data-parallel group: ranks e,
e+ep, e+2ep, ... for EP rank e. ZeRO-0 writes the torch optimizer's state_dict (state by parameter index)
into the model states file or, with experts, into one `expp_rank_E_mp_rank_00_optim_states.pt` per EP rank.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.checkpoint.io import load_file
from ember.engines.deepspeed.layout import (
    EXPERT_OPTIM_FILE,
    EXPERT_WEIGHTS_GLOB,
    MODEL_STATES,
    ZERO3_MODEL_STATES,
    ZERO_FILE,
)
from ember.errors import UserError
from ember.models.layers.moe import is_expert_parameter
from ember.models.layers.moe.experts import join_stacked, split_stacked
from ember.models.layers.moe.layouts import DEEPSPEED_GATE, EMBER_GATE, EXPERT_NAME, PER_EXPERT
from ember.world import ExpertPlacement, World

STACKED_NAME = re.compile(r"^(.*\.)experts\.(w_in|b_in|w_out|b_out)$")  # ember's stacked experts
EXPERTS_OF_LAYER = PER_EXPERT.split("{}")[0]  # a MoE layer's name + this: the prefix of its experts' names
PER_EXPERT_PARAM = {"w_in": "fc.weight", "b_in": "fc.bias", "w_out": "proj.weight", "b_out": "proj.bias"}
EP_GROUP = re.compile(r"^ep_size_(\d+)$")
TESTED_DEEPSPEED = ((0, 19), (0, 20))  # the file layout above is DeepSpeed 0.19's; others are refused, not guessed
MASTER = "master"  # the fp32 master weight, stored beside the optimizer state keys while joining


@dataclass(frozen=True)
class SavedLayout:
    world_size: int
    ep_size: int
    zero_stage: int

    def matches(self, world: World, zero_stage: int) -> bool:
        return (self.world_size, self.ep_size, self.zero_stage) == (world.world_size, world.ep_size, zero_stage)


@dataclass(frozen=True)
class ExpertLayout:
    """A model's MoE layers: the name prefix of each layer's experts -> the layer's number of experts."""

    layers: dict[str, int]

    def to_global(self, name: str, ep_size: int, ep_rank: int) -> str:
        parsed = self._parse(name, ep_size)
        if parsed is None:
            return self._saved_gate_name(name)
        prefix, local, rest, _ = parsed
        held = self.placement(prefix, ep_size, ep_rank).local_experts
        if local >= len(held):
            raise UserError(
                f"{name}: local expert {local} on a rank that holds {len(held)} experts (ep_size={ep_size})"
            )
        return f"{prefix}{held[local]}{rest}"

    def placement(self, prefix: str, ep_size: int, ep_rank: int) -> ExpertPlacement:
        """EP rank ep_rank of ep_size in the layer whose experts' names start with `prefix`."""
        self.local_count(prefix, ep_size)  # a user error for a layer this model lacks or an uneven split
        return ExpertPlacement(self.layers[prefix], ep_size, ep_rank)

    def local_count(self, prefix: str, ep_size: int) -> int:
        if prefix not in self.layers:
            raise UserError(f"the checkpoint has experts under {prefix!r}, which this model does not have")
        if self.layers[prefix] % ep_size:
            raise UserError(f"{prefix!r}: {self.layers[prefix]} experts cannot be split over ep_size={ep_size}")
        return self.layers[prefix] // ep_size

    def stacked(self, name: str, ep_size: int, ep_rank: int) -> tuple[str, list[str]] | None:
        """For a stacked expert tensor: its kind (w_in, ...) and the global per-expert names of its slices."""
        match = STACKED_NAME.match(name)
        if match is None or match.group(1) + EXPERTS_OF_LAYER not in self.layers:
            return None
        prefix = match.group(1) + EXPERTS_OF_LAYER
        suffix = PER_EXPERT_PARAM[match.group(2)]
        return match.group(2), [f"{prefix}{e}.{suffix}" for e in self.placement(prefix, ep_size, ep_rank).local_experts]

    def split(self, name: str, ep_size: int, ep_rank: int, tensors: dict[str, Any]) -> list[tuple[str, dict]]:
        """(global name, tensors) per parameter: one entry, or one per expert of a stacked tensor (scalars shared)."""
        stacked = self.stacked(name, ep_size, ep_rank)
        if stacked is None:
            return [(self.to_global(name, ep_size, ep_rank), tensors)]
        kind, names = stacked
        pieces = {key: split_stacked(kind, value, len(names)) if value.dim() else [value] * len(names)
                  for key, value in tensors.items()}
        return [(global_name, {key: pieces[key][e] for key in tensors}) for e, global_name in enumerate(names)]

    def gather(self, name: str, ep_size: int, ep_rank: int, table: dict[str, Any]) -> Any:
        """table[global name] for this rank's parameter, a stacked tensor joined from its experts' entries
        (entries may be tensors or dicts of tensors, e.g. an optimizer state)."""
        stacked = self.stacked(name, ep_size, ep_rank)
        if stacked is None:
            return _pick(table, self.to_global(name, ep_size, ep_rank))
        kind, names = stacked
        entries = [_pick(table, global_name) for global_name in names]
        if isinstance(entries[0], torch.Tensor):
            return join_stacked(kind, entries)
        return {key: join_stacked(kind, [entry[key] for entry in entries]) if value.dim() else value
                for key, value in entries[0].items()}

    def _saved_gate_name(self, name: str) -> str:
        """ember's router weight is saved under DeepSpeed's gate name (layouts.to_per_expert_layout)."""
        if name.endswith("." + EMBER_GATE):
            prefix = name[: -len(EMBER_GATE)]
            if prefix + EXPERTS_OF_LAYER in self.layers:
                return prefix + DEEPSPEED_GATE
        return name

    def _parse(self, name: str, ep_size: int) -> tuple[str, int, str, int] | None:
        match = EXPERT_NAME.match(name)
        if match is None:
            return None
        prefix, number, rest = match.groups()
        return prefix, int(number), rest, self.local_count(prefix, ep_size)


def expert_layout(module: torch.nn.Module) -> ExpertLayout:
    from deepspeed.moe.layer import MoE

    return ExpertLayout(
        {f"{name}.deepspeed_moe.experts.deepspeed_experts.": layer.num_experts
         for name, layer in module.named_modules() if isinstance(layer, MoE)}
    )


@dataclass
class FullState:
    """A checkpoint independent of the world that wrote it: every tensor whole, experts under global ids."""

    module: dict[str, torch.Tensor]  # the module's state_dict
    master: dict[str, torch.Tensor]  # fp32 master weight of every optimized parameter
    optimizer: dict[str, dict[str, torch.Tensor]]  # per parameter: exp_avg, exp_avg_sq (its shape), step
    group_lrs: list[float]  # learning rate of each optimizer group when saved
    scheduler: dict[str, Any] | None
    counters: dict[str, int]  # DeepSpeed's global_steps, global_samples, skipped_steps


# ---- what wrote the checkpoint ----------------------------------------------------------------------


def saved_layout(engine_dir: Path) -> SavedLayout:
    """Read from the files (memory-mapped, so cheap); the manifest one folder up must agree when present."""
    zero_files = _zero_files(engine_dir)
    if (engine_dir / ZERO3_MODEL_STATES).is_file():
        layout = SavedLayout(len(zero_files), _manifest(engine_dir).get("ep_size", 1), 3)
    elif zero_files:
        first = _load(zero_files[0], mmap=True)["optimizer_state_dict"]
        layout = SavedLayout(len(zero_files), _ep_size_of_groups(first), int(first["zero_stage"]))
    elif (engine_dir / MODEL_STATES).is_file():
        world_size = int(_load(engine_dir / MODEL_STATES, mmap=True)["dp_world_size"])
        ep_size = len(list(engine_dir.glob(EXPERT_OPTIM_FILE.format("*")))) or 1
        layout = SavedLayout(world_size, ep_size, 0)
    else:
        raise UserError(f"{engine_dir}: no DeepSpeed checkpoint files ({MODEL_STATES} or ZeRO shards)")
    _check_manifest(engine_dir, layout)
    return layout


def _zero_files(engine_dir: Path) -> list[Path]:
    found = {int(m.group(1)): p for p in engine_dir.glob("*zero_pp_rank_*") if (m := ZERO_FILE.match(p.name))}
    if sorted(found) != list(range(len(found))):
        raise UserError(f"{engine_dir}: ZeRO shards of ranks {sorted(found)} - some are missing")
    return [found[rank] for rank in range(len(found))]


def _ep_size_of_groups(zero_state: dict[str, Any]) -> int:
    """Expert groups are named by DeepSpeed's expert group (ep_size_N, see engines.deepspeed.name_expert_groups)."""
    sizes = set()
    for group in _rigid_base_state(zero_state)["param_groups"]:
        if group.get("moe"):
            match = EP_GROUP.match(str(group.get("name")))
            if match is None:
                raise UserError(f"expert optimizer group named {group.get('name')!r}: cannot tell its ep_size")
            sizes.add(int(match.group(1)))
    if len(sizes) > 1:
        raise UserError(f"the checkpoint mixes expert-parallel sizes {sorted(sizes)}; ember reshards one ep_size")
    return sizes.pop() if sizes else 1


def _manifest(engine_dir: Path) -> dict[str, Any]:
    path = engine_dir.parent / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_manifest(engine_dir: Path, layout: SavedLayout) -> None:
    manifest = _manifest(engine_dir)
    for key in ("world_size", "ep_size"):
        if key in manifest and manifest[key] != getattr(layout, key):
            raise UserError(
                f"{engine_dir}: the manifest says {key}={manifest[key]}, the DeepSpeed files say "
                f"{getattr(layout, key)}; refusing to guess which experts and shards are whose"
            )


# ---- saved files -> full tensors ----------------------------------------------------------------------


def read_full_state(
    engine_dir: Path, saved: SavedLayout, experts: ExpertLayout, groups: list[list[str]] | None = None
) -> FullState:
    """`groups`: this engine's optimizer groups as local parameter names (needed for ZeRO-0 files only)."""
    if saved.zero_stage == 3:
        raise UserError(f"{engine_dir}: ZeRO-3 checkpoints are not resharded; resume on {saved.world_size} workers")
    states = _load(engine_dir / MODEL_STATES)
    _check_saved_precision(engine_dir, saved, states.get("ds_config") or {})
    module = dict(states["module"])
    for path in sorted(engine_dir.glob(EXPERT_WEIGHTS_GLOB)):
        module.update(_load(path))  # keys already carry global expert ids
    if saved.zero_stage == 0:
        if groups is None:
            raise ValueError("reading a ZeRO-0 checkpoint needs the loading optimizer's groups")
        master, optimizer, lrs = _read_torch_optimizer(engine_dir, saved, experts, states, module, groups)
    else:
        master, optimizer, lrs = _read_zero_partitions(engine_dir, saved, experts, states["param_shapes"])
    counters = {key: int(states[key]) for key in ("global_steps", "global_samples", "skipped_steps") if key in states}
    full = FullState(module, master, optimizer, lrs, states.get("lr_scheduler"), counters)
    check_consistent(full, experts)
    return full


def _check_saved_precision(engine_dir: Path, saved: SavedLayout, config: dict[str, Any]) -> None:
    """The optimizer wrappers of fp16 (any stage) and bf16 at ZeRO-0 write other formats."""
    if config.get("fp16", {}).get("enabled"):
        raise UserError(f"{engine_dir}: fp16 checkpoints are not resharded; resume on {saved.world_size} workers")
    if saved.zero_stage == 0 and config.get("bf16", {}).get("enabled"):
        raise UserError(f"{engine_dir}: bf16 ZeRO-0 checkpoints are not resharded; resume on {saved.world_size} "
                        "workers")


def _read_zero_partitions(engine_dir, saved, experts, param_shapes) -> tuple[dict, dict, list[float]]:
    ranks = [_load(path)["optimizer_state_dict"] for path in _zero_files(engine_dir)]
    master, optimizer, lrs = {}, {}, []
    for index, group in enumerate(_rigid_base_state(ranks[0])["param_groups"]):
        lrs.append(group["lr"])
        for ep_rank, owners in _partition_owners(group, saved):
            for local, parts in _join_fragments([ranks[rank] for rank in owners], index).items():
                shape = torch.Size(param_shapes[index][local])
                whole = {key: _whole(value, shape, local) for key, value in parts.items()}
                _store(master, optimizer, experts.split(local, saved.ep_size, ep_rank, whole))
    return master, optimizer, lrs


def _store(master: dict, optimizer: dict, entries: list[tuple[str, dict[str, torch.Tensor]]]) -> None:
    for name, tensors in entries:
        _claim(master, name, tensors.pop(MASTER))
        optimizer[name] = tensors


def _partition_owners(group: dict[str, Any], saved: SavedLayout) -> list[tuple[int, list[int]]]:
    """(EP rank, saving ranks in partition order) for each set of partitions that joins into whole tensors."""
    if not group.get("moe"):
        return [(0, list(range(saved.world_size)))]
    # any expert count: which ranks replicate an EP rank depends on world and EP size only
    placement = ExpertPlacement(saved.ep_size, saved.ep_size)
    return [(ep_rank, list(placement.replica_ranks(ep_rank, saved.world_size))) for ep_rank in range(saved.ep_size)]


def _join_fragments(partitions: list[dict[str, Any]], index: int) -> dict[str, dict[str, list[torch.Tensor]]]:
    """Local name -> {master or state key: fragments in partition order}; scalar state (step) taken once."""
    joined: dict[str, dict[str, list[torch.Tensor]]] = {}
    for partition in partitions:
        flat = partition["single_partition_of_fp32_groups"][index]
        base = _rigid_base_state(partition)
        state = base["state"][base["param_groups"][index]["params"][0]]
        for name, address in partition["param_slice_mappings"][index].items():
            parts = joined.setdefault(name, {})
            for key, value in [(MASTER, flat), *state.items()]:
                if value.dim():
                    parts.setdefault(key, []).append(value.narrow(0, address.start, address.numel))
                else:
                    parts.setdefault(key, [value])
    return joined


def _claim(master: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in master:  # e.g. experts stacked in one tensor: every EP rank saves the same name
        raise UserError(f"{name}: saved by more than one EP rank under one name; its experts cannot be told apart")
    master[name] = value


def _whole(parts: list[torch.Tensor], shape: torch.Size, name: str) -> torch.Tensor:
    if parts[0].dim() == 0:
        return parts[0].clone()
    joined = torch.cat(parts)
    if joined.numel() != shape.numel():
        raise UserError(f"{name}: the ZeRO shards hold {joined.numel()} values for a {tuple(shape)} parameter")
    return joined.view(shape)


def _rigid_base_state(zero_state: dict[str, Any]) -> dict[str, Any]:
    base = zero_state["base_optimizer_state"]
    if not isinstance(base, dict):
        raise UserError("elastic ZeRO checkpoints (zero_optimization.elastic_checkpoint) are not resharded by ember")
    return base


def _read_torch_optimizer(engine_dir, saved, experts, states, module, groups) -> tuple[dict, dict, list[float]]:
    """ZeRO-0: the torch optimizer's state_dict, state keyed by the parameter's index in group order."""
    files = [engine_dir / EXPERT_OPTIM_FILE.format(rank) for rank in range(saved.ep_size)] if experts.layers else []
    saved_states = [_load(path)["optimizer"] for path in files] if files else [states["optimizer"]]
    saved_groups = relayout_groups(groups, experts, saved.ep_size)
    master, optimizer = {}, {}
    for ep_rank, state_dict in enumerate(saved_states):
        if len(state_dict["param_groups"]) != len(saved_groups):
            raise UserError(f"{engine_dir}: {len(state_dict['param_groups'])} optimizer groups saved, model has "
                            f"{len(saved_groups)}")
        for names, group in zip(saved_groups, state_dict["param_groups"], strict=True):
            if ep_rank > 0 and not group.get("moe"):
                continue  # dense state is the same in every EP rank's file
            if len(names) != len(group["params"]):
                raise UserError(f"{engine_dir}: optimizer group {group.get('name')!r} holds {len(group['params'])} "
                                f"parameters, the model's layout for ep_size={saved.ep_size} has {len(names)}")
            for local, index in zip(names, group["params"], strict=True):
                weight = experts.gather(local, saved.ep_size, ep_rank, module).float()
                state = state_dict["state"].get(index, {})  # none for a parameter that never had a gradient
                tensors = {MASTER: weight, **{key: v.view(weight.shape) if v.dim() else v for key, v in state.items()}}
                _store(master, optimizer, experts.split(local, saved.ep_size, ep_rank, tensors))
    return master, optimizer, [group["lr"] for group in saved_states[0]["param_groups"]]


def relayout_groups(groups: list[list[str]], experts: ExpertLayout, ep_size: int) -> list[list[str]]:
    """The optimizer groups' local names for another ep_size: each expert layer's run of local experts
    (module order: layer, expert, parameter) regrown to that many experts; dense names stay."""
    result = []
    for names in groups:
        layers: dict[str, list[str]] = {}  # prefix -> parameter suffixes of one expert, in order
        dense = []
        for name in names:
            match = EXPERT_NAME.match(name)
            if match is None:
                dense.append(name)
            elif match.group(3) not in (suffixes := layers.setdefault(match.group(1), [])):
                suffixes.append(match.group(3))
        if dense and layers:
            raise ValueError("an optimizer group mixes expert and dense parameters")
        regrown = [f"{prefix}{local}{suffix}" for prefix, suffixes in layers.items()
                   for local in range(experts.local_count(prefix, ep_size)) for suffix in suffixes]
        result.append(dense or regrown)
    return result


def check_consistent(full: FullState, experts: ExpertLayout) -> None:
    """Refuse what would mix up experts: every layer's experts complete, and every optimizer copy equal to
    the saved weight of the same name (the weight files carry global ids; the optimizer names are derived)."""
    for prefix, count in experts.layers.items():
        found = {int(m.group(2)) for name in full.module if (m := EXPERT_NAME.match(name)) and m.group(1) == prefix}
        if found != set(range(count)):
            raise UserError(f"{prefix!r}: the checkpoint holds experts {sorted(found)}, the model has {count}")
    for name, master in full.master.items():
        weight = full.module.get(name)
        if weight is None or weight.shape != master.shape or not torch.equal(master.to(weight.dtype), weight):
            raise UserError(
                f"{name}: the optimizer's fp32 copy does not match the saved weight, so shards and experts would be "
                "mixed up (ember reads expert placement as EP rank = rank % ep_size); refusing to load"
            )


# ---- full tensors -> this rank ----------------------------------------------------------------------


@torch.no_grad()
def load_full_state(ds, full: FullState, experts: ExpertLayout, world: World) -> None:
    """Write this rank's part of `full` into a freshly initialised DeepSpeed engine (ZeRO 0-2)."""
    def lookup(table: dict[str, Any], name: str) -> Any:
        return experts.gather(name, world.ep_size, world.ep_rank, table)

    module_state = {name: lookup(full.module, name) for name in ds.module.state_dict()}
    ds.module.load_state_dict(module_state, strict=True)
    optimizer = ds.optimizer
    if _is_partitioned(optimizer):
        _load_partitions(ds, full, lookup)
    else:
        _load_torch_optimizer(ds, full, lookup)
    if len(optimizer.param_groups) != len(full.group_lrs):
        raise UserError(
            f"the checkpoint has {len(full.group_lrs)} optimizer groups, this model {len(optimizer.param_groups)}"
        )
    for group, lr in zip(optimizer.param_groups, full.group_lrs, strict=True):
        group["lr"] = lr  # the scheduler's last value; torch's load_state_dict would restore it the same way
    if ds.lr_scheduler is not None and full.scheduler is not None:
        ds.lr_scheduler.load_state_dict(full.scheduler)
    for key, value in full.counters.items():
        setattr(ds, key, value)


def _load_partitions(ds, full: FullState, lookup) -> None:
    """ZeRO-1/2: fill each group's flat fp32 partition and a fresh optimizer state for it, fragment by fragment."""
    zero = ds.optimizer
    for index, params in enumerate(zero.bit16_groups):
        flat = zero.single_partition_of_fp32_groups[index]
        template = lookup(full.optimizer, ds.param_names[params[0]])
        state = {key: torch.zeros_like(flat) if value.dim() else value.clone() for key, value in template.items()}
        for param in params:
            mapping = param._hp_mapping
            if mapping is None:  # no fragment of this parameter in this rank's partition
                continue
            name = ds.param_names[param]
            source = {MASTER: lookup(full.master, name), **lookup(full.optimizer, name)}
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            for key, value in source.items():
                if value.dim():
                    target = flat if key == MASTER else state[key]
                    target.narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))
        zero.optimizer.state[flat] = state
    zero._hp_optimizer_states_linked = False  # re-link fragment views to the new state tensors at the next step


def _load_torch_optimizer(ds, full: FullState, lookup) -> None:
    """ZeRO-0: DeepSpeed steps ember's torch optimizer on the module's own parameters."""
    optimizer = ds.optimizer
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param] = {
                key: value.clone().view_as(param) if value.dim() else value.clone()
                for key, value in lookup(full.optimizer, ds.param_names[param]).items()
            }


def load_resharded(ds, engine_dir: Path, world: World, saved: SavedLayout) -> None:
    """Collective in spirit only: every rank reads the files and takes its own part; no communication."""
    problem = reshard_problem(ds)
    if problem:
        raise UserError(
            f"{engine_dir} was saved by {saved.world_size} workers with ep_size={saved.ep_size} (ZeRO-"
            f"{saved.zero_stage}); this run has {world.world_size} with ep_size={world.ep_size}, and {problem}"
        )
    experts = expert_layout(ds.module)
    partitioned = _is_partitioned(ds.optimizer)
    params = ds.optimizer.bit16_groups if partitioned else [group["params"] for group in ds.optimizer.param_groups]
    groups = [[ds.param_names[param] for param in group] for group in params]
    full = read_full_state(engine_dir, saved, experts, groups)
    load_full_state(ds, full, experts, world)


def reshard_problem(ds) -> str | None:
    """Why this engine cannot take a resharded checkpoint, or None."""
    version = deepspeed_version()
    low, high = TESTED_DEEPSPEED
    if not low <= version[:2] < high:
        tested, this = f"{low[0]}.{low[1]}", ".".join(map(str, version))
        return (f"resharding reads DeepSpeed {tested}.x's file layout and this is DeepSpeed {this}; resume on the "
                f"saving world size, or install deepspeed=={tested}.* (constraints.txt pins the tested version)")
    stage = ds.zero_optimization_stage()
    if stage >= 3:
        return "ZeRO-3 checkpoints are not resharded; resume on the saving world size or use ZeRO 0-2"
    if ds.fp16_enabled():
        return "fp16 checkpoints (dynamic loss scale) are not resharded; use bf16 or fp32"
    if ds.bfloat16_enabled() and stage == 0:
        return "bf16 at ZeRO-0 (DeepSpeed's bf16 optimizer wrapper) is not resharded; use ZeRO-1/2 or fp32"
    if ds.zero_cpu_offload() or ds.zero_nvme_offload_optimizer():
        return "resharding does not support optimizer offload"
    experts = expert_layout(ds.module)
    if any(getattr(param, "group_name", "ep_size_1") != "ep_size_1" for param in _unmapped_experts(ds.module, experts)):
        return "some expert parameters are neither one expert each nor ember's stacked experts"
    return None


def deepspeed_version() -> tuple[int, ...]:
    import deepspeed

    return tuple(int(part) for part in re.findall(r"\d+", deepspeed.__version__)[:3])


def _unmapped_experts(module: torch.nn.Module, experts: ExpertLayout) -> list[torch.nn.Parameter]:
    """Expert parameters whose global expert ids ember cannot map (neither deepspeed_experts.N nor stacked)."""
    return [p for name, p in module.named_parameters()
            if is_expert_parameter(p) and not EXPERT_NAME.match(name) and experts.stacked(name, 1, 0) is None]


def _is_partitioned(optimizer) -> bool:
    """ZeRO-1/2 step flat fp32 partitions; at ZeRO-0 DeepSpeed steps ember's torch optimizer itself."""
    return hasattr(optimizer, "single_partition_of_fp32_groups")


def _pick(tensors: dict[str, Any], name: str) -> Any:
    if name not in tensors:
        raise UserError(f"{name}: not in the checkpoint being resharded (a different model or expert count?)")
    return tensors[name]


def _load(path: Path, mmap: bool = False) -> Any:
    return load_file(path, "the DeepSpeed checkpoint", mmap=mmap)
