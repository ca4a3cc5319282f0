"""`ember generate`: single-process generation with a KV cache, the reference the server is tested against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ember.checkpoint.readers import read_checkpoint_spec
from ember.data.tokenizer import checkpoint_tokenizer
from ember.errors import UserError
from ember.generation.decode import Admit, DecodeRunner, StepPlan, encode_prompt, finish_reason
from ember.generation.precision import generation_dtype
from ember.generation.sampling import SamplingParams
from ember.serve.weights import load_rank_model


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str


def generate(
    path: Path, prompt: str, max_tokens: int, params: SamplingParams, stop: list[str] | None = None,
    dtype: str = "auto",
) -> Completion:
    """On this process's CPU, in `dtype` (generation/precision.py), as a serving rank with the same dtype runs."""
    checkpoint, _, _ = read_checkpoint_spec(path)  # verified once, here
    model, spec = load_rank_model(checkpoint, verify=False)
    model.to(generation_dtype(dtype, torch.device("cpu"), spec.engine.precision))
    tokenizer = checkpoint_tokenizer(checkpoint, spec)
    prompt_tokens = encode_prompt(prompt, tokenizer)
    check_prompt_fits(len(prompt_tokens), model.spec.seq_len)
    runner = DecodeRunner(model)
    plan, generated = StepPlan(admit=[Admit(0, prompt_tokens, params)]), []
    while True:
        generated.append(runner.step(plan)[0].token)
        reason = finish_reason(generated, len(prompt_tokens), max_tokens, model.spec.seq_len, stop or [], tokenizer)
        if reason is not None:
            return Completion(generated, tokenizer.decode(generated), reason)
        plan = StepPlan(decode=[0])


def check_prompt_fits(length: int, seq_len: int) -> None:
    if length > seq_len:
        raise UserError(f"prompt: {length} tokens, longer than the model's context of {seq_len}")
