"""Continuous batching: one step loop per replica admits and retires sequences at every decode step.

Requests join a waiting line; each iteration the loop admits what fits (up to max_batch running
sequences), places each new sequence on the least loaded rank (its cache stays there), sends every rank
its plan - ids, prompt tokens, sampling parameters, ids to retire - and hands each picked token to its
request. A sequence that finished (or whose client went away) is retired in the next step's plan.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from ember.generation.decode import Admit, StepPlan, finish_reason
from ember.generation.sampling import SamplingParams

StepFn = Callable[[list[StepPlan]], Awaitable[dict[int, int]]]


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    stop: list[str]
    rank: int = -1
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # (token, finish reason or None), or an error


class StepLoop:
    def __init__(self, step: StepFn, ranks: int, seq_len: int, max_batch: int = 64, tokenizer=None) -> None:
        self.step_fn, self.ranks, self.seq_len, self.max_batch = step, ranks, seq_len, max_batch
        self.tokenizer = tokenizer  # decodes for stop strings; None: bytes
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.retiring: list[Sequence] = []
        self.ids = itertools.count()
        self.wake = asyncio.Event()
        self.failure: BaseException | None = None
        self.steps = 0
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def generate(
        self, prompt: list[int], max_tokens: int, params: SamplingParams, stop: list[str]
    ) -> AsyncIterator[tuple[int, str | None]]:
        """Yield (token, finish reason or None) as the sequence advances; the last one carries the reason."""
        if self.failure is not None:
            raise RuntimeError(f"the serving ranks failed: {self.failure}")
        sequence = Sequence(next(self.ids), prompt, max_tokens, params, stop)
        self.waiting.append(sequence)
        self.wake.set()
        try:
            while True:
                item = await sequence.queue.get()
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
            try:
                picked = await self.step_fn(plans)
            except BaseException as exc:  # a rank died or hung: fail everyone; the health check restarts us
                self.fail(exc)
                raise
            self.steps += 1
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
            sequence = self.waiting.popleft()
            if sequence.cancelled:
                continue
            sequence.rank = min(range(self.ranks), key=lambda r: (len(plans[r].admit) + len(plans[r].decode), r))
            plans[sequence.rank].admit.append(Admit(sequence.seq_id, sequence.prompt, sequence.params))
            self.running[sequence.seq_id] = sequence
        return plans

    def deliver(self, picked: dict[int, int]) -> None:
        for seq_id, token in picked.items():
            sequence = self.running[seq_id]
            sequence.generated.append(token)
            reason = finish_reason(
                sequence.generated, len(sequence.prompt), sequence.max_tokens, self.seq_len, sequence.stop,
                self.tokenizer,
            )
            sequence.queue.put_nowait((token, reason))
            if reason is not None:
                self.retiring.append(self.running.pop(seq_id))

    def fail(self, exc: BaseException) -> None:
        self.failure = exc
        for sequence in [*self.running.values(), *self.waiting]:
            sequence.queue.put_nowait(exc)
        self.running.clear()
        self.waiting.clear()
