"""Continuous batching, run inside the serving ranks: no Ray call stands between two decode steps.

The step loop (DriverLoop) is a thread of EP rank 0. Each iteration it admits what fits (up to max_batch
running sequences, and on each rank what its KV-cache budget holds), places each new sequence on the least
loaded rank (its cache stays there), hands every rank its plan - ids, prompt tokens, sampling parameters,
ids to retire - over the ranks' own process group, runs its share, gathers the picks and decides which
sequences are finished (length, context, stop strings). Then the next step starts at once.

The replica's side (StepLoop) only submits requests, cancels those whose client went away, and collects
the steps' tokens in batches with a long poll that runs beside the steps, not between them:

    driver = DriverLoop(step, Scheduler(ranks=2, seq_len=128, max_batch=64))   # in rank 0 (or a test)
    loop = StepLoop(LocalDriver(driver)); loop.start()                         # in the replica
    async for picked, reason in loop.generate(prompt, 16, params, stop=[]): ...

A sequence a rank could not take fails alone (Picked.error); a failed step (a rank died or hung) fails
everyone, and the replica's health check then has Serve replace it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from ember.generation.decode import Admit, Picked, StepPlan, finish_reason
from ember.generation.sampling import SamplingParams

IDLE_BEAT_S = 10.0  # an idle driver calls `idle` this often (rank 0 keeps the others' collectives from timing out)
POLL_S = 1.0  # a poll returns empty after this, so a replica never waits on a rank for long
CANCELS_KEPT = 4096  # cancels of ids not (yet) known: a cancel may overtake its own submit between threads


class SequenceFailed(Exception):
    """One sequence could not go on (the others did)."""


class Overloaded(Exception):
    """The waiting line is full: the client should retry later."""


@dataclass(frozen=True)
class Request:
    """One sequence to generate, as the replica submits it."""

    seq_id: int
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    stop: list[str]
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def admit(self) -> Admit:
        return Admit(self.seq_id, self.prompt, self.params, self.logprobs, self.prompt_logprobs)


Event = tuple[int, Picked, "str | None"]  # a sequence's outcome of one step and why it ended (None: it goes on)


@dataclass
class Stats:
    steps: int = 0
    step_seconds: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    waiting: int = 0  # submitted, not yet admitted
    running: int = 0


@dataclass
class Polled:
    events: list[Event]
    stats: Stats
    failure: str | None = None


@dataclass
class Running:
    request: Request
    rank: int
    generated: list[int] = field(default_factory=list)


class Scheduler:
    """Which sequences each rank steps, and when each is done. One thread owns it (the driver's)."""

    def __init__(self, ranks: int, seq_len: int, max_batch: int = 64, max_per_rank: int | None = None,
                 tokenizer=None) -> None:  # fmt: skip
        self.ranks, self.seq_len, self.max_batch = ranks, seq_len, max_batch
        self.max_per_rank = max_per_rank  # per rank: its KV-cache budget
        self.tokenizer = tokenizer  # decodes for stop strings; None: bytes
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Running] = {}
        self.retiring: list[Running] = []
        self.cancelled: OrderedDict[int, None] = OrderedDict()
        self.tokens_in = self.tokens_out = 0

    def busy(self) -> bool:
        """Something to step. Sequences to retire alone are not: their caches go at the next step's start,
        before it admits anything (a retire-only step would run every rank's forward for nothing)."""
        return bool(self.waiting or self.running)

    def submit(self, request: Request) -> None:
        if request.seq_id in self.cancelled:  # its client went away before it arrived
            del self.cancelled[request.seq_id]
            return
        self.waiting.append(request)

    def cancel(self, seq_id: int) -> None:
        """The client went away: retire the sequence at the next step (or forget it if it still waits)."""
        if seq_id in self.running:
            self.retiring.append(self.running.pop(seq_id))
            return
        before = len(self.waiting)
        self.waiting = deque(request for request in self.waiting if request.seq_id != seq_id)
        if len(self.waiting) == before:  # not here yet (or finished already): drop it if it comes
            self.cancelled[seq_id] = None
            while len(self.cancelled) > CANCELS_KEPT:
                self.cancelled.popitem(last=False)

    def plan(self) -> list[StepPlan]:
        plans = [StepPlan() for _ in range(self.ranks)]
        for sequence in self.retiring:
            plans[sequence.rank].retire.append(sequence.request.seq_id)
        self.retiring = []
        for seq_id, sequence in self.running.items():
            plans[sequence.rank].decode.append(seq_id)
        while self.waiting and len(self.running) < self.max_batch:
            rank = min(range(self.ranks), key=lambda r: (len(plans[r].admit) + len(plans[r].decode), r))
            if self.max_per_rank is not None and len(plans[rank].admit) + len(plans[rank].decode) >= self.max_per_rank:
                break  # the least loaded rank's cache budget is full: wait for a sequence to retire
            request = self.waiting.popleft()
            plans[rank].admit.append(request.admit())
            self.tokens_in += len(request.prompt)
            self.running[request.seq_id] = Running(request, rank)
        return plans

    def deliver(self, picked: dict[int, Picked]) -> list[Event]:
        events: list[Event] = []
        for seq_id, outcome in picked.items():
            sequence = self.running[seq_id]
            if outcome.error is not None:  # the rank dropped it already
                self.running.pop(seq_id)
                events.append((seq_id, outcome, None))
                continue
            sequence.generated.append(outcome.token)
            self.tokens_out += 1
            request = sequence.request
            reason = finish_reason(sequence.generated, len(request.prompt), request.max_tokens, self.seq_len,
                                   request.stop, self.tokenizer)  # fmt: skip
            events.append((seq_id, outcome, reason))
            if reason is not None:
                self.retiring.append(self.running.pop(seq_id))
        return events


class DriverLoop:
    """The step loop: `run` (a thread of its own) steps while there is work; `submit`, `cancel` and `poll`
    are safe from any other thread. `step` runs one step on every rank and returns every rank's picks."""

    def __init__(self, step: Callable[[list[StepPlan]], dict[int, Picked]], scheduler: Scheduler,
                 idle: Callable[[], None] | None = None, idle_s: float = IDLE_BEAT_S) -> None:  # fmt: skip
        self.step, self.scheduler, self.idle, self.idle_s = step, scheduler, idle, idle_s
        self.cond = threading.Condition()
        self.inbox: list[Request | int] = []  # requests to submit, ids to cancel: in arrival order
        self.events: list[Event] = []
        self.stats = Stats()
        self.failure: str | None = None
        self.stopping = False

    def submit(self, requests: list[Request]) -> None:
        with self.cond:
            self.inbox.extend(requests)
            self.stats.waiting += len(requests)
            self.cond.notify_all()

    def cancel(self, seq_id: int) -> None:
        with self.cond:
            self.inbox.append(seq_id)
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def poll(self, timeout_s: float = POLL_S) -> Polled:
        """What the steps since the last poll produced; waits up to timeout_s for something."""
        with self.cond:
            self.cond.wait_for(lambda: self.events or self.failure is not None or self.stopping, timeout_s)
            events, self.events = self.events, []
            return Polled(events, replace(self.stats), self.failure)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            with self.cond:
                self.failure = f"{type(exc).__name__}: {exc}"
                self.cond.notify_all()
            raise

    def _run(self) -> None:
        scheduler = self.scheduler
        while True:
            with self.cond:
                woken = self.cond.wait_for(lambda: self.inbox or self.stopping or scheduler.busy(), self.idle_s)
                if self.stopping:
                    return
                inbox, self.inbox = self.inbox, []
            for item in inbox:
                if isinstance(item, Request):
                    scheduler.submit(item)
                else:
                    scheduler.cancel(item)
            if not scheduler.busy():
                if not woken and self.idle is not None:
                    self.idle()
                self._publish([], None)
                continue
            plans = scheduler.plan()
            started = time.perf_counter()
            picked = self.step(plans)
            self._publish(scheduler.deliver(picked), time.perf_counter() - started)

    def _publish(self, events: list[Event], step_seconds: float | None) -> None:
        scheduler = self.scheduler
        with self.cond:
            self.events.extend(events)
            stats = self.stats
            if step_seconds is not None:
                stats.steps += 1
                stats.step_seconds += step_seconds
            stats.tokens_in, stats.tokens_out = scheduler.tokens_in, scheduler.tokens_out
            stats.waiting = len(scheduler.waiting) + sum(isinstance(item, Request) for item in self.inbox)
            stats.running = len(scheduler.running)
            self.cond.notify_all()


class Driver(Protocol):
    """Where StepLoop sends requests: a DriverLoop in this process, or in EP rank 0 (serve/expert_actor.py)."""

    def submit(self, request: Request) -> None: ...

    def cancel(self, seq_id: int) -> None: ...

    async def poll(self) -> Polled: ...


class LocalDriver:
    """A DriverLoop on a thread of this process."""

    def __init__(self, loop: DriverLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=loop.run, name="ember-step-loop", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        self.loop.submit([request])

    def cancel(self, seq_id: int) -> None:
        self.loop.cancel(seq_id)

    async def poll(self) -> Polled:
        return await asyncio.to_thread(self.loop.poll, POLL_S)

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join()


class StepLoop:
    """The replica's side: each request's sequence in, its tokens out as the driver's steps produce them."""

    def __init__(self, driver: Driver, max_waiting: int = 256) -> None:
        self.driver, self.max_waiting = driver, max_waiting
        self.queues: dict[int, asyncio.Queue] = {}  # (picked, finish reason or None), or an error
        self.unstarted: set[int] = set()  # submitted, no token back yet: the waiting line `room` bounds
        self.ids = itertools.count()
        self.stats = Stats()  # the driver's, as of the last poll
        self.failure: BaseException | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    def room(self, sequences: int) -> bool:
        return len(self.unstarted) + sequences <= self.max_waiting

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
            raise Overloaded(f"{len(self.unstarted)} sequences wait already")
        seq_id = next(self.ids)
        self.queues[seq_id] = queue = asyncio.Queue()
        self.unstarted.add(seq_id)
        self.driver.submit(Request(seq_id, prompt, max_tokens, params, stop, logprobs, prompt_logprobs))
        ended = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    ended = True
                    raise RuntimeError(f"the serving ranks failed: {item}") from item
                picked, reason = item
                if picked.error is not None:  # the rank dropped it already
                    ended = True
                    raise SequenceFailed(picked.error)
                ended = reason is not None
                yield item
                if ended:
                    return
        finally:
            self.queues.pop(seq_id, None)
            self.unstarted.discard(seq_id)
            if not ended:  # a client that went away: the driver retires it at its next step
                self.driver.cancel(seq_id)

    async def run(self) -> None:
        while True:
            try:
                polled = await self.driver.poll()
            except BaseException as exc:  # rank 0 died: fail everyone; the health check restarts us
                self.fail(exc)
                raise
            self.stats = polled.stats
            for seq_id, picked, reason in polled.events:
                self.unstarted.discard(seq_id)
                queue = self.queues.get(seq_id)
                if queue is not None:
                    queue.put_nowait((picked, reason))
            if polled.failure is not None:  # a step failed (a rank died or hung)
                self.fail(RuntimeError(polled.failure))
                raise self.failure

    def fail(self, exc: BaseException) -> None:
        self.failure = exc
        for queue in self.queues.values():
            queue.put_nowait(exc)
