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
    logprobs: int | None = None  # report the picked token's log-probability and this many alternatives
    prompt_logprobs: bool = False  # and the prompt's tokens' (echo), on the first step


@dataclass
class StepPlan:
    """What one runner does in one step: retire first, then prefill `admit` and extend `decode`."""

    admit: list[Admit] = field(default_factory=list)
    decode: list[int] = field(default_factory=list)  # ids of sequences that continue with their last pick
    retire: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.admit or self.decode or self.retire)


TopLogprobs = tuple[tuple[int, float], ...]  # (token, log-probability), most likely first


@dataclass(frozen=True)
class Picked:
    """One sequence's outcome of a step: its next token (with log-probabilities if asked), or why it failed."""

    token: int = -1
    logprob: float | None = None
    top: TopLogprobs = ()
    prompt: tuple[tuple[float, TopLogprobs], ...] | None = None  # prompt tokens 1.. (echo)
    error: str | None = None


@dataclass
class LiveSequence:
    cache: KVCache
    admit: Admit
    generator: torch.Generator
    pending: list[int]  # tokens the next forward feeds: the prompt, then each picked token
    generated: list[int] = field(default_factory=list)


class DecodeRunner:
    def __init__(self, model: GPT, device: torch.device | str = "cpu") -> None:
        self.model = model.eval()
        self.device = torch.device(device)
        self.live: dict[int, LiveSequence] = {}

    @torch.no_grad()
    def step(self, plan: StepPlan) -> dict[int, Picked]:
        """Run one forward over this runner's sequences (possibly none: collectives still need this rank).

        A sequence the model cannot take (a token outside the vocabulary, a prompt over the context) or whose
        pick fails gets an error of its own; the others go on. Such checks come before the forward, which on
        an expert-parallel rank must run whatever happens (the other ranks wait in its all-to-alls).
        """
        for seq_id in plan.retire:
            self.live.pop(seq_id, None)
        refused = {}
        for admit in plan.admit:
            admitted = self.admitted(admit)
            if isinstance(admitted, str):
                refused[admit.seq_id] = Picked(error=admitted)
            else:
                self.live[admit.seq_id] = admitted
        ids = [admit.seq_id for admit in plan.admit if admit.seq_id not in refused] + list(plan.decode)
        sequences = [self.live[seq_id] for seq_id in ids]
        lengths = [len(seq.pending) for seq in sequences]
        flat = [token for seq in sequences for token in seq.pending]
        tokens = torch.tensor(flat, dtype=torch.long, device=self.device).view(1, -1)
        logits = self.model(tokens, RaggedKV([seq.cache for seq in sequences], lengths)).logits[0].float()
        ends = torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()
        picked = dict(refused)
        for seq_id, seq, end, length in zip(ids, sequences, ends, lengths, strict=True):
            picked[seq_id] = self.pick(seq, logits[end - length : end])
            if picked[seq_id].error is not None:
                self.live.pop(seq_id)
        return picked

    def admitted(self, admit: Admit) -> LiveSequence | str:
        """The new sequence, or why this runner cannot take it."""
        vocab, context = self.model.spec.vocab_size, self.model.spec.seq_len
        if not 0 < len(admit.prompt) <= context:
            return f"prompt: {len(admit.prompt)} tokens; the model's context is {context}"
        if not all(0 <= token < vocab for token in admit.prompt):
            return f"prompt: a token outside the model's vocabulary of {vocab}"
        try:
            generator = admit.params.generator()
        except (RuntimeError, ValueError, OverflowError) as exc:  # e.g. a seed of 2^64 or more
            return f"sampling failed: seed {admit.params.seed}: {exc}"
        return LiveSequence(self.model.new_cache(), admit, generator, list(admit.prompt))

    def pick(self, seq: LiveSequence, rows: torch.Tensor) -> Picked:
        """The next token from the last row; log-probabilities from the raw rows, as vLLM reports them."""
        try:
            last = rows[-1].cpu()
            token = seq.admit.params.pick(last, seq.generator, seq.admit.prompt, seq.generated)
        except (RuntimeError, ValueError, IndexError) as exc:  # e.g. NaN logits: this sequence only
            return Picked(error=f"sampling failed: {exc}")
        seq.generated.append(token)
        seq.pending = [token]
        if seq.admit.logprobs is None:
            return Picked(token)
        count = seq.admit.logprobs
        logprob, top = token_logprobs(last.log_softmax(-1), token, count)
        prompt = None
        if seq.admit.prompt_logprobs and len(seq.generated) == 1:
            table = rows[:-1].cpu().log_softmax(-1)
            prompt = tuple(token_logprobs(row, t, count) for row, t in zip(table, seq.admit.prompt[1:], strict=True))
        return Picked(token, logprob, top, prompt)


def token_logprobs(logprobs: torch.Tensor, token: int, count: int) -> tuple[float, TopLogprobs]:
    """A token's log-probability and the `count` most likely tokens' (ties broken by the lower id)."""
    values, order = torch.sort(logprobs, descending=True, stable=True)
    top = tuple((int(t), float(v)) for t, v in zip(order[:count], values[:count], strict=True))
    return float(logprobs[token]), top


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
