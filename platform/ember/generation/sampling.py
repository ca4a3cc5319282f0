"""Autoregressive sampling: greedy, temperature, top-k and top-p (nucleus), penalties and logit bias, seeded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures under this pick greedily (as vLLM does): 1/T would overflow the logits


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens; temperature 0 is greedy. The seed fixes the whole sequence.

    Penalties as vLLM applies them: repetition divides the positive logits (multiplies the negative ones) of
    every token seen in the prompt or the output; presence and frequency subtract from the output's tokens.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)

    def pick(
        self, logits: torch.Tensor, generator: torch.Generator, prompt: list[int] = (), generated: list[int] = ()
    ) -> int:
        logits = self.adjust(logits.float().cpu(), prompt, generated)
        return pick_token(logits, self.temperature, self.top_k, generator, self.top_p)

    def adjust(self, logits: torch.Tensor, prompt: list[int], generated: list[int]) -> torch.Tensor:
        """Logit bias and penalties applied to a copy of one row of logits."""
        logits = logits.clone()
        for token, bias in self.logit_bias:
            logits[token] += bias
        if self.repetition_penalty != 1.0 and (prompt or generated):
            seen = torch.tensor(sorted(set(prompt) | set(generated)), dtype=torch.long)
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / self.repetition_penalty, values * self.repetition_penalty)
        if (self.presence_penalty or self.frequency_penalty) and generated:
            counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.numel()).float()
            logits -= self.frequency_penalty * counts + self.presence_penalty * (counts > 0).float()
        return logits


@torch.no_grad()
def sample_tokens(
    forward: Callable[[torch.Tensor], torch.Tensor],
    prompt: list[int],
    max_new_tokens: int,
    seq_len: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[int]:
    """`forward` maps [1, T] token ids to [1, T, vocab] logits; the context is cropped to seq_len."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tokens = list(prompt) or [0]
    for _ in range(max_new_tokens):
        context = torch.tensor([tokens[-seq_len:]], dtype=torch.long, device=device)
        logits = forward(context)[0, -1].float().cpu()
        tokens.append(pick_token(logits, temperature, top_k, generator))
    return tokens[len(prompt) :] if prompt else tokens[1:]


def pick_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator, top_p: float | None = None
) -> int:
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        probs = nucleus(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (always the top one)."""
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above each
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def decode_bytes(tokens: list[int]) -> str:
    return bytes(t for t in tokens if 0 < t < 256).decode("utf-8", errors="replace")


@torch.no_grad()
def sample_image_tokens(
    forward: Callable[[torch.Tensor], torch.Tensor],
    classes: torch.Tensor,
    seq_len: int,
    levels: int,
    temperature: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Square grey images from an image-token GPT, one per class in `classes`, as [B, 1, H, W] in [-1, 1].

    Row layout (data.decode=image_tokens): token `levels + class` first, then seq_len pixel tokens; only the
    grey-level tokens are allowed when sampling pixels.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = (classes.long() + levels).view(-1, 1).to(device)
    for _ in range(seq_len):
        logits = forward(tokens)[:, -1, :levels].float().cpu()
        if temperature <= 0:
            picked = logits.argmax(dim=-1, keepdim=True)
        else:
            picked = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)
        tokens = torch.cat([tokens, picked.to(device)], dim=1)
    side = int(round(seq_len**0.5))
    pixels = tokens[:, 1:].float().cpu() / (levels - 1)
    return (pixels * 2 - 1).view(-1, 1, side, side)
