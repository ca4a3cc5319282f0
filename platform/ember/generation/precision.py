"""The precision a model generates in (weights and KV cache): `--dtype auto|fp32|bf16|fp16`.

auto: fp32 on CPU (bf16 matmuls are slower there on most CPUs and fp32 is what tests compare); on a GPU the
precision the checkpoint was trained in when it is a 16-bit one, else bf16 - half the memory of fp32 weights
and KV cache, as vLLM's `--dtype auto` serves an fp32 checkpoint in 16 bits.
"""

from __future__ import annotations

import torch

from ember.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = ("auto", *DTYPES)


def generation_dtype(choice: str, device: torch.device, trained: str = "fp32") -> torch.dtype:
    """`choice` from the CLI; `trained`: the checkpoint's engine.precision."""
    if choice not in CHOICES:
        raise UserError(f"--dtype {choice}: use one of {', '.join(CHOICES)}")
    if choice != "auto":
        return DTYPES[choice]
    if device.type == "cpu":
        return torch.float32
    return DTYPES[trained] if trained in ("bf16", "fp16") else torch.bfloat16


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, known in DTYPES.items() if known == dtype)
