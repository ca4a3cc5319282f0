"""Real token rows for tests that train without shards: the bytes of the standard library's inspect.py."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch


def text_rows(offset: int, count: int, seq_len: int = 32) -> torch.Tensor:
    """`count` rows of seq_len + 1 consecutive bytes (inputs and shifted targets), starting at byte `offset`."""
    data = torch.tensor(list(Path(inspect.__file__).read_bytes()), dtype=torch.long)
    return torch.stack([data[offset + i * (seq_len + 1) : offset + (i + 1) * (seq_len + 1)] for i in range(count)])
