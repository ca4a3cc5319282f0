"""Continuous batching: one step loop per replica admits and retires sequences at every decode step.

Requests join a waiting line; each iteration the loop admits what fits (up to max_batch running
sequences), places each new sequence on the least loaded rank (its cache stays there), sends every rank
its plan - ids, prompt tokens, sampling parameters, ids to retire - and hands each picked token to its
request. A sequence that finished (or whose client went away) is retired in the next step's plan. A sequence
a rank could not take fails alone (SequenceFailed); a failed step (a rank died or hung) fails everyone.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from ember.generation.decode import Admit, Picked, StepPlan, finish_reason
from ember.generation.sampling import SamplingParams

StepFn = Callable[[list[StepPlan]], Awaitable[dict[int, Picked]]]


class SequenceFailed(Exception):
    """One sequence could not go on (the others did)."""


class Overloaded(Exception):
    """The waiting line is full: the client should retry later."""


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    stop: list[str]
    logprobs: int | None = None
    prompt_logprobs: bool = False
    rank: int = -1
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # (token, finish reason or None), or an error


class StepLoop:
    def __init__(
        self, step: StepFn, ranks: int, seq_len: int, max_batch: int = 64, max_waiting: int = 256,
        max_per_rank: int | None = None, tokenizer=None,
    ) -> None:  # fmt: skip
        self.step_fn, self.ranks, self.seq_len, self.max_batch = step, ranks, seq_len, max_batch
        self.max_waiting, self.max_per_rank = max_waiting, max_per_rank  # per rank: its KV-cache budget
        self.tokenizer = tokenizer  # decodes for stop strings; None: bytes
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.retiring: list[Sequence] = []
        self.ids = itertools.count()
        self.wake = asyncio.Event()
        self.failure: BaseException | None = None
        self.steps = 0
        self.step_seconds = 0.0
        self.tokens_in = self.tokens_out = 0
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    def room(self, sequences: int) -> bool:
        return len(self.waiting) + sequences <= self.max_waiting

    async def generate(
        self,
        prompt: list[int],
        max_tokens: int,
        params: SamplingParams,
        stop: list[str],
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
    ) -> AsyncIterator[tuple[Picked, str | None]]:
        """Yield (picked, finish reason or None) as the sequence advances; the last one carries the reason."""
        if self.failure is not None:
            raise RuntimeError(f"the serving ranks failed: {self.failure}")
        if not self.room(1):
            raise Overloaded(f"{len(self.waiting)} sequences wait already")
        sequence = Sequence(next(self.ids), prompt, max_tokens, params, stop, logprobs, prompt_logprobs)
        self.waiting.append(sequence)
        self.wake.set()
        try:
            while True:
                item = await sequence.queue.get()
                if isinstance(item, SequenceFailed):
                    raise item
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the serving ranks failed: {item}") from item
                yield item
                if item[1] is not None:
                    return
        finally:
            sequence.cancelled = True  # a client that went away: retire at the next step

    async def run(self) -> None:
        while True:
            if not (self.waiting or self.running or self.retiring):
                self.wake.clear()
                await self.wake.wait()
                continue
            plans = self.plan()
            started = time.perf_counter()
            try:
                picked = await self.step_fn(plans)
            except BaseException as exc:  # a rank died or hung: fail everyone; the health check restarts us
                self.fail(exc)
                raise
            self.steps += 1
            self.step_seconds += time.perf_counter() - started
            self.deliver(picked)

    def plan(self) -> list[StepPlan]:
        plans = [StepPlan() for _ in range(self.ranks)]
        for sequence in self.retiring:
            plans[sequence.rank].retire.append(sequence.seq_id)
        self.retiring = []
        for sequence in list(self.running.values()):
            if sequence.cancelled:
                plans[sequence.rank].retire.append(self.running.pop(sequence.seq_id).seq_id)
            else:
                plans[sequence.rank].decode.append(sequence.seq_id)
        while self.waiting and len(self.running) < self.max_batch:
            rank = min(range(self.ranks), key=lambda r: (len(plans[r].admit) + len(plans[r].decode), r))
            if self.max_per_rank is not None and len(plans[rank].admit) + len(plans[rank].decode) >= self.max_per_rank:
                break  # the least loaded rank's cache budget is full: wait for a sequence to retire
            sequence = self.waiting.popleft()
            if sequence.cancelled:
                continue
            sequence.rank = rank
            admit = Admit(sequence.seq_id, sequence.prompt, sequence.params, sequence.logprobs,
                          sequence.prompt_logprobs)  # fmt: skip
            plans[sequence.rank].admit.append(admit)
            self.tokens_in += len(sequence.prompt)
            self.running[sequence.seq_id] = sequence
        return plans

    def deliver(self, picked: dict[int, Picked]) -> None:
        for seq_id, outcome in picked.items():
            sequence = self.running[seq_id]
            if outcome.error is not None:  # the rank dropped it already
                sequence.queue.put_nowait(SequenceFailed(outcome.error))
                self.running.pop(seq_id)
                continue
            sequence.generated.append(outcome.token)
            self.tokens_out += 1
            reason = finish_reason(
                sequence.generated, len(sequence.prompt), sequence.max_tokens, self.seq_len, sequence.stop,
                self.tokenizer,
            )
            sequence.queue.put_nowait((outcome, reason))
            if reason is not None:
                self.retiring.append(self.running.pop(seq_id))

    def fail(self, exc: BaseException) -> None:
        self.failure = exc
        for sequence in [*self.running.values(), *self.waiting]:
            sequence.queue.put_nowait(exc)
        self.running.clear()
        self.waiting.clear()
