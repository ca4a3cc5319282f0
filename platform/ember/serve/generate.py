"""`ember generate`: single-process generation with a KV cache, the reference the server is tested against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ember.errors import UserError
from ember.serve.decode import Admit, DecodeRunner, StepPlan, encode_prompt, finish_reason
from ember.serve.sampling import SamplingParams, decode_bytes
from ember.serve.weights import load_rank_model


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str


def generate(
    path: Path, prompt: str, max_tokens: int, params: SamplingParams, stop: list[str] | None = None
) -> Completion:
    model, spec = load_rank_model(path)
    prompt_tokens = encode_prompt(prompt)
    check_prompt_fits(len(prompt_tokens), model.spec.seq_len)
    runner = DecodeRunner(model)
    plan, generated = StepPlan(admit=[Admit(0, prompt_tokens, params)]), []
    while True:
        generated.append(runner.step(plan)[0].token)
        reason = finish_reason(generated, len(prompt_tokens), max_tokens, model.spec.seq_len, stop or [])
        if reason is not None:
            return Completion(generated, decode_bytes(generated), reason)
        plan = StepPlan(decode=[0])


def check_prompt_fits(length: int, seq_len: int) -> None:
    if length > seq_len:
        raise UserError(f"prompt: {length} tokens, longer than the model's context of {seq_len}")
