"""The KV-cache budget of a serving rank: how many sequences it may hold at once.

Each sequence's cache holds keys and values of every layer for the whole context (serve/decode.py allocates
it at admission), so a budget in bytes is a number of sequences per rank, and the step loop admits by it.
"""

from __future__ import annotations

from ember.errors import UserError
from ember.spec.model import GPTSpec

MIB = 1 << 20


def kv_bytes_per_sequence(model: GPTSpec, element_size: int = 4) -> int:
    """Keys and values, [heads x head_dim = d_model] per position, of every layer over the whole context."""
    return 2 * model.n_layers * model.seq_len * model.d_model * element_size


def sequences_per_rank(model: GPTSpec, kv_cache_mb: float | None, max_batch: int) -> int | None:
    """None without a budget; otherwise how many sequences one rank's budget holds (UserError if none)."""
    if kv_cache_mb is None:
        return None
    each = kv_bytes_per_sequence(model)
    fits = int(kv_cache_mb * MIB) // each
    if fits < 1:
        shape = f"2 x {model.n_layers} layers x {model.seq_len} positions x {model.d_model} x fp32"
        raise UserError(f"--kv-cache-mb {kv_cache_mb}: holds no sequence; each needs {each / MIB:.3f} MiB ({shape})")
    return min(fits, max_batch)
