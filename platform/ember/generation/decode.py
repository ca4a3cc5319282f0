"""One rank's share of a decode step: prefill admitted sequences and extend running ones in one forward.

The same runner serves `ember generate` (one process, one sequence) and every expert-parallel actor of
`ember serve`; only which sequences it holds and which experts its model has differ. A step carries only
sequence ids, prompt tokens and sampling parameters: each sequence's cache, random generator and last
picked token stay with the runner that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ember.data.tokenizer import TextTokenizer
from ember.generation.sampling import SamplingParams, decode_bytes
from ember.models.gpt import GPT
from ember.models.layers.attention import KVCache, RaggedKV


@dataclass(frozen=True)
class Admit:
    seq_id: int
    prompt: list[int]
    params: SamplingParams


@dataclass
class StepPlan:
    """What one runner does in one step: retire first, then prefill `admit` and extend `decode`."""

    admit: list[Admit] = field(default_factory=list)
    decode: list[int] = field(default_factory=list)  # ids of sequences that continue with their last pick
    retire: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.admit or self.decode or self.retire)


@dataclass
class LiveSequence:
    cache: KVCache
    params: SamplingParams
    generator: torch.Generator
    pending: list[int]  # tokens the next forward feeds: the prompt, then each picked token


class DecodeRunner:
    def __init__(self, model: GPT, device: torch.device | str = "cpu") -> None:
        self.model = model.eval()
        self.device = torch.device(device)
        self.live: dict[int, LiveSequence] = {}

    @torch.no_grad()
    def step(self, plan: StepPlan) -> dict[int, int]:
        """Run one forward over this runner's sequences (possibly none: collectives still need this rank)."""
        for seq_id in plan.retire:
            self.live.pop(seq_id, None)
        for admit in plan.admit:
            cache = self.model.new_cache()
            self.live[admit.seq_id] = LiveSequence(cache, admit.params, admit.params.generator(), list(admit.prompt))
        ids = [admit.seq_id for admit in plan.admit] + list(plan.decode)
        sequences = [self.live[seq_id] for seq_id in ids]
        lengths = [len(seq.pending) for seq in sequences]
        flat = [token for seq in sequences for token in seq.pending]
        tokens = torch.tensor(flat, dtype=torch.long, device=self.device).view(1, -1)
        logits = self.model(tokens, RaggedKV([seq.cache for seq in sequences], lengths)).logits[0]
        last_rows = torch.tensor(lengths, dtype=torch.long).cumsum(0) - 1
        last_logits = logits.index_select(0, last_rows.to(logits.device)).float().cpu()
        picked = {}
        for seq_id, seq, row in zip(ids, sequences, last_logits, strict=True):
            seq.pending = [seq.params.pick(row, seq.generator)]
            picked[seq_id] = seq.pending[0]
        return picked


def finish_reason(
    generated: list[int], prompt_length: int, max_tokens: int, seq_len: int, stop: list[str],
    tokenizer: TextTokenizer | None = None,
) -> str | None:
    """Why a sequence ends after `generated`, or None while it goes on.

    "stop": its text contains a stop string (the completion keeps it); "length": max_tokens reached, or the
    context is full (feeding the k-th picked token needs position prompt_length + k - 1 < seq_len).
    """
    text = (tokenizer.decode(generated) if tokenizer else decode_bytes(generated)) if stop else ""
    if stop and any(s in text for s in stop):
        return "stop"
    if len(generated) >= max_tokens or prompt_length + len(generated) > seq_len:
        return "length"
    return None


def encode_prompt(text: str, tokenizer: TextTokenizer | None = None) -> list[int]:
    """The checkpoint's tokens (bytes by default); an empty prompt starts from token 0 as the training sampler does."""
    return (tokenizer or TextTokenizer()).encode_prompt(text)
