"""OpenAI completions and chat completions from the step loop: one sequence per choice, answers and SSE chunks.

A request with P prompts and n choices becomes P x n sequences (choice index = prompt index x n + c, seeds
seed + c), decoded together with everyone else's by the step loop. Text follows vLLM: a stop string is left
out of the text (the stream holds back as many characters as a stop string could still need), `echo` puts
the prompt first, and log-probabilities are the model's own, before penalties and temperature.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ember.data.tokenizer import TextTokenizer
from ember.generation.decode import Picked, TopLogprobs
from ember.generation.sampling import SamplingParams
from ember.serve.batching import Overloaded, SequenceFailed
from ember.serve.protocol import MAX_SEED, ApiError

Generate = Callable[..., AsyncIterator[tuple[Picked, str | None]]]


@dataclass(frozen=True)
class Choice:
    index: int
    prompt: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Shape:
    """What every choice of one request shares."""

    max_tokens: int  # 0: the prompt's log-probs only (echo)
    stop: list[str]
    logprobs: int | None
    echo: bool
    chat: bool
    model: str
    prompt_tokens: int  # usage counts each prompt once, whatever n
    include_usage: bool = False
    tokenizer: TextTokenizer | None = None  # the checkpoint's; None or a path-less one: bytes
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    def header(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "object": kind, "created": self.created,
                "model": self.model}  # fmt: skip


def choices_for(prompts: list[list[int]], n: int, params: SamplingParams, seed: int | None) -> list[Choice]:
    def seed_of(c: int) -> int:
        return secrets.randbits(63) if seed is None else (seed + c) % (MAX_SEED + 1)

    return [Choice(p * n + c, prompt, replace(params, seed=seed_of(c))) for p, prompt in enumerate(prompts)
            for c in range(n)]  # fmt: skip


def tokenizer_file(tokenizer: TextTokenizer | None) -> TextTokenizer | None:
    """The tokenizer when it is a file (BPE), None when tokens are bytes."""
    return tokenizer if tokenizer is not None and tokenizer.path is not None else None


def token_text(token: int, tokenizer: TextTokenizer | None = None) -> str:
    """A token's text; a byte token as OpenAI writes single bytes that are no character of their own."""
    if tokenizer_file(tokenizer) is not None:
        return tokenizer.decode([token])
    if 0 < token < 128:
        return chr(token)
    return f"bytes:\\x{token:02x}" if 128 <= token < 256 else f"<|token_{token}|>"


class ChoiceText:
    """Tokens -> text, holding back an incomplete UTF-8 character and whatever a stop string could still need."""

    def __init__(self, stop: list[str], tokenizer: TextTokenizer | None = None) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokenizer, self.tokens = tokenizer_file(tokenizer), []
        self.stop, self.text, self.sent, self.chunks = stop, "", 0, 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token: int | None, reason: str | None) -> str:
        if self.tokenizer is None:
            piece = bytes([token]) if token is not None and 0 < token < 256 else b""
            self.text += self.decoder.decode(piece, final=reason is not None)
            ready = len(self.text)
        else:  # a byte-level BPE token can end inside a character: hold back the replacement until it completes
            self.tokens += [] if token is None else [token]
            self.text = self.tokenizer.decode(self.tokens)
            ready = len(self.text) if reason is not None else len(self.text.rstrip("\ufffd"))
        end = ready - self.hold if reason is None else self.end(reason)
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def end(self, reason: str) -> int:
        found = [i for s in self.stop if (i := self.text.find(s)) >= 0] if reason == "stop" else []
        return min(found, default=len(self.text))


def prompt_text(prompt: list[int], tokenizer: TextTokenizer | None = None) -> str:
    if tokenizer_file(tokenizer) is not None:
        return tokenizer.decode(prompt)
    return bytes(t for t in prompt if 0 < t < 256).decode("utf-8", errors="replace")


@dataclass
class Logprobs:
    """Per-token entries (token, its log-prob or None, its rivals) in either API's format."""

    entries: list[tuple[int, float | None, TopLogprobs]] = field(default_factory=list)

    def add_prompt(self, prompt: list[int], picked: Picked) -> None:
        self.entries.append((prompt[0], None, ()))
        self.entries += [(t, lp, top) for t, (lp, top) in zip(prompt[1:], picked.prompt or (), strict=True)]

    def add(self, picked: Picked) -> None:
        self.entries.append((picked.token, picked.logprob, picked.top))

    def completion(self, tokenizer: TextTokenizer | None = None, offset: int = 0) -> dict[str, Any]:
        decoder, text, offsets = codecs.getincrementaldecoder("utf-8")(errors="replace"), "", []
        bpe = tokenizer_file(tokenizer)
        for i, (token, _, _) in enumerate(self.entries):
            offsets.append(offset + len(text))
            if bpe is None:
                text += decoder.decode(bytes([token]) if 0 < token < 256 else b"")
            else:
                text = bpe.decode([t for t, _, _ in self.entries[: i + 1]]).rstrip("\ufffd")
        tops = [None if lp is None else {token_text(t, bpe): v for t, v in ((token, lp), *top)}
                for token, lp, top in self.entries]  # fmt: skip
        return {"tokens": [token_text(t, bpe) for t, _, _ in self.entries], "top_logprobs": tops,
                "text_offset": offsets, "token_logprobs": [lp for _, lp, _ in self.entries]}  # fmt: skip

    def chat(self, tokenizer: TextTokenizer | None = None) -> dict[str, Any]:
        bpe = tokenizer_file(tokenizer)

        def entry(token: int, logprob: float) -> dict[str, Any]:
            raw = [token] if bpe is None and 0 < token < 256 else list(token_text(token, bpe).encode()) if bpe else []
            return {"token": token_text(token, bpe), "logprob": logprob, "bytes": raw}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(r, v) for r, v in top]}
                            for t, lp, top in self.entries]}  # fmt: skip


async def run_choice(generate: Generate, choice: Choice, shape: Shape) -> AsyncIterator[tuple[Picked, str | None]]:
    """The sequence's (picked, finish reason) pairs; with max_tokens 0 one pair whose token is not kept."""
    asked = max(shape.max_tokens, 1)  # the prefill that scores the prompt picks one token anyway
    prompt_logprobs = shape.echo and shape.logprobs is not None
    sequence = generate(choice.prompt, asked, choice.params, shape.stop, shape.logprobs, prompt_logprobs)
    async for picked, reason in sequence:
        yield (picked, "length" if shape.max_tokens == 0 else reason)


def failure(exc: BaseException) -> ApiError:
    if isinstance(exc, Overloaded):
        return ApiError(503, f"the server is busy ({exc}); retry later", None, "overloaded", {"Retry-After": "1"})
    if isinstance(exc, SequenceFailed):
        return ApiError(500, f"this request's sequence failed: {exc}", None, "sequence_failed")
    return ApiError(503, str(exc), None, "ranks_failed", {"Retry-After": "5"})


async def collect(generate: Generate, choices: list[Choice], shape: Shape) -> dict[str, Any]:
    """The whole answer: every choice run to its end together; the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(collect_choice(generate, choice, shape)) for choice in choices]
    try:
        answers = await asyncio.gather(*tasks)
    except (RuntimeError, SequenceFailed, Overloaded) as exc:
        raise failure(exc) from exc
    finally:
        for task in tasks:
            task.cancel()
    completion = sum(answer.pop("completion_tokens") for answer in answers)
    return {**shape.header(chunk=False), "choices": answers, "usage": usage(shape.prompt_tokens, completion)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


async def collect_choice(generate: Generate, choice: Choice, shape: Shape) -> dict[str, Any]:
    text, logprobs, tokens, reason, pieces = ChoiceText(shape.stop, shape.tokenizer), Logprobs(), [], None, []
    async for picked, reason in run_choice(generate, choice, shape):
        if shape.echo and shape.logprobs is not None and picked.prompt is not None:
            logprobs.add_prompt(choice.prompt, picked)
        if shape.max_tokens > 0:
            tokens.append(picked.token)
            pieces.append(text.add(picked.token, reason))
            logprobs.add(picked)
    return answer(choice, shape, "".join(pieces), tokens, logprobs, reason)


def answer(
    choice: Choice, shape: Shape, text: str, tokens: list[int], logprobs: Logprobs, reason: str | None
) -> dict[str, Any]:
    if shape.chat:
        body = {"index": choice.index, "message": {"role": "assistant", "content": text},
                "logprobs": logprobs.chat(shape.tokenizer) if shape.logprobs is not None else None}  # fmt: skip
    else:
        echoed = prompt_text(choice.prompt, shape.tokenizer) if shape.echo else ""
        body = {"index": choice.index, "text": echoed + text, "tokens": tokens,
                "logprobs": logprobs.completion(shape.tokenizer) if shape.logprobs is not None else None}  # fmt: skip
    return {**body, "finish_reason": reason, "completion_tokens": len(tokens)}


async def stream(generate: Generate, choices: list[Choice], shape: Shape) -> AsyncIterator[str]:
    """SSE: one chunk per token of each choice as it comes, then the usage (if asked) and [DONE]."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for item in run_choice(generate, choice, shape):
                await queue.put((choice, item))
            await queue.put((choice, None))
        except (RuntimeError, SequenceFailed, Overloaded) as exc:
            await queue.put((choice, failure(exc)))

    tasks = [asyncio.ensure_future(pump(choice)) for choice in choices]
    states = {choice.index: ChoiceText(shape.stop, shape.tokenizer) for choice in choices}
    completion, running = 0, len(choices)
    try:
        while running:
            choice, item = await queue.get()
            if item is None:
                running -= 1
                continue
            if isinstance(item, ApiError):
                yield sse(item.body())
                break
            completion += shape.max_tokens > 0
            update = chunk_choice(choice, shape, states[choice.index], *item)
            yield sse({**shape.header(chunk=True), "choices": [update]})
        else:
            if shape.include_usage:
                yield sse({**shape.header(chunk=True), "choices": [], "usage": usage(shape.prompt_tokens, completion)})
    finally:
        for task in tasks:
            task.cancel()
    yield "data: [DONE]\n\n"


def chunk_choice(choice: Choice, shape: Shape, state: ChoiceText, picked: Picked, reason: str | None) -> dict:
    logprobs = Logprobs()
    first, state.chunks = state.chunks == 0, state.chunks + 1
    if shape.echo and shape.logprobs is not None and picked.prompt is not None:
        logprobs.add_prompt(choice.prompt, picked)
    kept = shape.max_tokens > 0
    if kept:
        logprobs.add(picked)
    text = state.add(picked.token if kept else None, reason)
    if shape.chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": choice.index, "delta": delta, "finish_reason": reason,
                "logprobs": logprobs.chat(shape.tokenizer) if shape.logprobs is not None else None}  # fmt: skip
    echoed = prompt_text(choice.prompt, shape.tokenizer) if shape.echo and first else ""
    return {"index": choice.index, "text": echoed + text, "token": picked.token if kept else None,
            "finish_reason": reason,
            "logprobs": logprobs.completion(shape.tokenizer) if shape.logprobs is not None else None}  # fmt: skip


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
