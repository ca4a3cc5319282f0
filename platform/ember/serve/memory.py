"""The KV-cache budget of a serving rank: how many sequences it may hold at once.

Each sequence's cache holds keys and values of every layer for the whole context (serve/decode.py allocates
it at admission), so a budget in bytes is a number of sequences per rank, and the step loop admits by it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from ember.errors import UserError
from ember.spec.model import GPTSpec

MIB = 1 << 20
# Without --kv-cache-mb: this share of the memory free once the weights are loaded (as vLLM's
# gpu_memory_utilization leaves room for activations and the allocator), split among the ranks that share it.
DEFAULT_KV_FRACTION = 0.5


def free_memory_bytes(device: torch.device) -> int:
    """Memory a rank could still take: the GPU's free memory, or the host's MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_kv_cache_mb(ranks: Sequence[dict[str, Any]]) -> float:
    """The per-rank budget when none is given: DEFAULT_KV_FRACTION of each memory pool's free bytes, split
    among the ranks on it (CPU ranks of one host share its RAM; each GPU rank has its own), the smallest."""
    sharing = Counter(rank["memory_pool"] for rank in ranks)
    return min(DEFAULT_KV_FRACTION * rank["free_memory_bytes"] / sharing[rank["memory_pool"]] for rank in ranks) / MIB


def kv_bytes_per_sequence(model: GPTSpec, element_size: int = 4) -> int:
    """Keys and values, [heads x head_dim = d_model] per position, of every layer over the whole context."""
    return 2 * model.n_layers * model.seq_len * model.d_model * element_size


def sequences_per_rank(model: GPTSpec, kv_cache_mb: float | None, max_batch: int, element_size: int = 4) -> int | None:
    """None without a budget; otherwise how many sequences one rank's budget holds (UserError if none)."""
    if kv_cache_mb is None:
        return None
    each = kv_bytes_per_sequence(model, element_size)
    fits = int(kv_cache_mb * MIB) // each
    if fits < 1:
        shape = f"2 x {model.n_layers} layers x {model.seq_len} positions x {model.d_model} x {element_size} bytes"
        raise UserError(f"--kv-cache-mb {kv_cache_mb}: holds no sequence; each needs {each / MIB:.3f} MiB ({shape})")
    return min(fits, max_batch)
