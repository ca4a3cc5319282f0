"""Where each expert lives: recorded in every checkpoint manifest so serving can load the same layout."""

from __future__ import annotations

import socket
from typing import Any

import torch.distributed as dist

from ember.spec.model import GPTSpec
from ember.world import World


def gather_hosts(world: World) -> list[dict[str, str | None]]:
    """Every rank's host name and Ray node id (None outside Ray), in rank order (collective)."""
    mine = {"host": socket.gethostname(), "node_id": ray_node_id()}
    hosts = [mine] * world.world_size
    if world.world_size > 1:
        dist.all_gather_object(hosts, mine)
    return hosts


def ray_node_id() -> str | None:
    """Two Ray nodes can share a host; the node id tells them apart."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None


def expert_placement(model: GPTSpec, world: World, hosts: list[dict[str, str | None]]) -> dict[str, Any] | None:
    """layer -> global expert -> EP rank, and which ranks (on which hosts) hold each EP rank's experts."""
    moe = model.moe
    if moe is None:
        return None
    counts = {layer: model.moe_layer_spec(layer).num_experts for layer in model.moe_layers}
    return {
        "ep_size": moe.ep_size,
        "num_experts": max(counts.values()),
        "layers": {str(layer): {str(e): e // (n // moe.ep_size) for e in range(n)} for layer, n in counts.items()},
        "ranks": [{"rank": r, **hosts[r], "ep_rank": r % moe.ep_size} for r in range(world.world_size)],
    }
