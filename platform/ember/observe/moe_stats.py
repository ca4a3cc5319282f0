"""MoE routing observability: per-layer expert load, drops, losses and router entropy.

Training writes them to TensorBoard under `moe/layer_<L>/...` (scalars, and a histogram whose buckets are the
expert ids, so TensorBoard draws the load per expert); `ember moe-stats RUN_DIR` reads them back and prints
an imbalance table. Values are averaged over all ranks: each rank routes its own tokens.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ember.errors import UserError
from ember.observe.tensorboard import TensorBoardLogger

SCALARS = ("dropped_fraction", "balance_loss", "z_loss", "router_entropy")
LOAD_TAG = re.compile(r"^moe/layer_(\d+)/load/expert_(\d+)$")
BLOCK_NAME = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def routing_stats(model: nn.Module) -> dict[int, dict[str, torch.Tensor]]:
    """Block index -> the routing stats of its MoE layer's latest forward (layers that keep none are left out)."""
    found = {}
    for name, module in model.named_modules():
        stats = getattr(module, "last_stats", None)
        match = BLOCK_NAME.search(name + ".")
        if isinstance(stats, dict) and stats and match and int(match.group(1)) not in found:
            found[int(match.group(1))] = stats
    return found


def mean_over_ranks(stats: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """Every value averaged over the ranks, in one all-reduce (collective: every rank calls it)."""
    if not stats or not dist.is_initialized() or dist.get_world_size() == 1:
        return stats
    flat = [(layer, key, value) for layer, values in sorted(stats.items()) for key, value in sorted(values.items())]
    packed = torch.cat([value.float().reshape(-1) for _, _, value in flat])
    dist.all_reduce(packed)
    packed = packed / dist.get_world_size()
    result: dict[int, dict[str, torch.Tensor]] = {}
    offset = 0
    for layer, key, value in flat:
        result.setdefault(layer, {})[key] = packed[offset : offset + value.numel()].view(value.shape)
        offset += value.numel()
    return result


def log_routing(logger: TensorBoardLogger, step: int, stats: dict[int, dict[str, torch.Tensor]]) -> None:
    for layer, values in stats.items():
        prefix = f"moe/layer_{layer}/"
        load = values["expert_fraction"].detach().float().cpu()
        scalars = {key: float(values[key]) for key in SCALARS}
        scalars["max_load"] = float(load.max() * load.numel())  # 1.0 is perfect balance
        scalars.update({f"load/expert_{e:03d}": float(f) for e, f in enumerate(load)})
        if "score_bias" in values:  # moe.balance: bias: the selection bias each expert has reached
            scalars.update({f"bias/expert_{e:03d}": float(b) for e, b in enumerate(values["score_bias"].cpu())})
        logger.scalars(step, scalars, prefix=prefix)
        logger.bars(step, f"{prefix}expert_fraction", load)


def read_routing(tensorboard_dir: Path) -> tuple[int, dict[int, dict[str, Any]]]:
    """The latest logged step and, per MoE layer, its scalars and expert loads (read back from event files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = [tag for tag in accumulator.Tags().get("scalars", []) if tag.startswith("moe/layer_")]
    if not tags:
        return 0, {}
    step = max(accumulator.Scalars(tag)[-1].step for tag in tags)
    layers: dict[int, dict[str, Any]] = {}
    for tag in tags:
        events = [event for event in accumulator.Scalars(tag) if event.step == step]
        if not events:
            continue
        layer = int(tag.split("/")[1].removeprefix("layer_"))
        entry = layers.setdefault(layer, {"load": {}})
        load = LOAD_TAG.match(tag)
        if load:
            entry["load"][int(load.group(2))] = events[-1].value
        elif "/bias/expert_" in tag:  # moe.balance: bias
            entry.setdefault("bias", {})[int(tag.rsplit("_", 1)[1])] = events[-1].value
        else:
            entry[tag.rsplit("/", 1)[1]] = events[-1].value
    return step, layers


def imbalance_rows(layers: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per layer: how far its expert load is from uniform, and what the router paid for it."""
    rows = []
    for layer, entry in sorted(layers.items()):
        load = torch.tensor([entry["load"][e] for e in sorted(entry["load"])])
        experts = load.numel()
        hottest = torch.argsort(load, descending=True, stable=True)[:3].tolist()
        rows.append({
            "layer": layer, "experts": experts,
            "max_load": float(load.max() * experts), "min_load": float(load.min() * experts),
            "load_cv": float(load.std(unbiased=False) / load.mean()) if experts > 1 else 0.0,
            "idle_experts": int((load == 0).sum()),
            "dropped": entry.get("dropped_fraction", 0.0),
            "entropy": entry.get("router_entropy", 0.0) / math.log(experts) if experts > 1 else 1.0,
            "balance_loss": entry.get("balance_loss", 0.0), "z_loss": entry.get("z_loss", 0.0),
            "hottest": hottest,
        })
    return rows


def moe_stats_table(run_dir: Path) -> tuple[int, list[dict[str, Any]]]:
    """`ember moe-stats`: the latest step's imbalance rows, or a UserError saying what is missing."""
    folder = run_dir / "tensorboard"
    if not folder.is_dir():
        raise UserError(f"{run_dir}: no tensorboard/ folder (was logging.tensorboard false, or is it not a run?)")
    step, layers = read_routing(folder)
    if not layers:
        raise UserError(f"{folder}: no MoE routing stats logged (a dense model, or model.moe.impl: deepspeed)")
    return step, imbalance_rows(layers)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text (fits 80 columns at any terminal width)."""
    lines = ["layer experts max_load min_load    cv idle dropped entropy    aux       z  hottest"]
    for row in rows:
        lines.append(
            f"{row['layer']:>5} {row['experts']:>7} {row['max_load']:>8.2f} {row['min_load']:>8.2f} "
            f"{row['load_cv']:>5.2f} {row['idle_experts']:>4} {row['dropped']:>7.1%} {row['entropy']:>7.2f} "
            f"{row['balance_loss']:>6.3f} {row['z_loss']:>7.3g}  {' '.join(map(str, row['hottest']))}"
        )
    return "\n".join(lines)
