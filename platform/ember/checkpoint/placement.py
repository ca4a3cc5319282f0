"""Where each expert lives: recorded in every checkpoint manifest so serving can load the same layout."""

from __future__ import annotations

import socket
from typing import Any

import torch.distributed as dist

from ember.spec.model import GPTSpec
from ember.world import World


def gather_hosts(world: World) -> list[str]:
    """Every rank's host name, in rank order (collective)."""
    hosts = [socket.gethostname()] * world.world_size
    if world.world_size > 1:
        dist.all_gather_object(hosts, socket.gethostname())
    return hosts


def expert_placement(model: GPTSpec, world: World, hosts: list[str]) -> dict[str, Any] | None:
    """layer -> global expert -> EP rank, and which ranks (on which hosts) hold each EP rank's experts."""
    moe = model.moe
    if moe is None:
        return None
    per_rank = moe.num_experts // moe.ep_size
    moe_layers = [i for i in range(model.n_layers) if (i + 1) % moe.every_n_layers == 0]
    return {
        "ep_size": moe.ep_size,
        "num_experts": moe.num_experts,
        "layers": {str(layer): {str(e): e // per_rank for e in range(moe.num_experts)} for layer in moe_layers},
        "ranks": [{"rank": r, "host": hosts[r], "ep_rank": r % moe.ep_size} for r in range(world.world_size)],
    }
