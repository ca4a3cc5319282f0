"""From the spec's data section to a rank's batches (`build_stream`), with or without DataLoader workers.

With `data.num_workers = W > 0`, worker w of a rank reads the rank's slots `[w::W]` through its own
ShardStream in a DataLoader process. Every batch comes back with the cursor of that worker's slots *after*
the batch, so the rank's state is what the trainer consumed, not what the workers prefetched. A DataLoader
hands out batches from its workers in turn starting at its worker 0; on resume, worker processes are
renumbered so that the first one serves the worker whose batch was next, which makes the batch sequence
after a resume the one an uninterrupted run would have seen.

Workers hand their batches over in groups (`GROUP_BATCHES`, `GROUP_BYTES`): each item through a worker's
queue pays a fixed cost (pickle, pipe, unpickle), which capped small text batches at ~2,400 a second here; 16
at a time, ~5,700 (bench/RESULTS.md, *Data loading*). The trainer's process keeps each worker's group and takes
one batch from each worker in turn, so the sequence of batches (and every cursor) is the same whatever the
group sizes, and a resume in mid-group is exact.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ember.data.cursor import merge_states, next_worker_key
from ember.data.formats import ImageRows, ImageTokenRows, RowFormat, TextRows, TokenizedText
from ember.data.stream import ShardStream, WeightedUrls
from ember.data.tokenizer import TextTokenizer
from ember.errors import InternalError, UserError
from ember.spec.data import DataSpec

StreamFactory = Callable[..., ShardStream]
GROUP_BATCHES = 16  # a worker's batches per transfer, at most
GROUP_BYTES = 4 << 20  # ... and about this many bytes of arrays: a large batch crosses alone, prefetch stays small


class BatchStream(Protocol):
    """What the trainer uses: endless batches, a cursor to save and restore, and the skip count."""

    @property
    def skipped(self) -> int: ...

    def __iter__(self) -> BatchStream: ...

    def __next__(self) -> Any: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def build_stream(
    data: DataSpec,
    model: Any,
    micro_batch: int,
    rank: int,
    world_size: int,
    split: Literal["train", "val"] = "train",
) -> BatchStream:
    """The rank's training batches; or, for "val", the held-out batches every rank reads alike (a val set is
    small, and MoE ranks run their forward passes in lockstep anyway)."""
    options = {
        "micro_batch": micro_batch,
        "rows": row_format(data, model),
        "num_slots": data.num_slots,
        "seed": data.seed,
        "on_error": data.on_error,
    }
    if split == "train":
        options["shuffle_buffer"] = data.shuffle_buffer
    if split == "val":
        if data.val is None:
            raise InternalError("build_stream(split='val') without data.val")
        return ShardStream(data.val.urls, rank=0, world_size=1, **options)
    make = partial(ShardStream, training_urls(data), rank=rank, world_size=world_size, **options)
    if data.num_workers == 0:
        return make()
    return WorkerLoader(partial(make, num_workers=data.num_workers), data.num_workers, rank, world_size)


def training_urls(data: DataSpec) -> str | list[str] | list[WeightedUrls]:
    if data.sources is None:
        return data.train.urls
    return [WeightedUrls(source.urls, source.weight) for source in data.sources]


def row_format(data: DataSpec, model: Any) -> RowFormat:
    """The decode the spec asks for, checked against the model that will read it."""
    family = getattr(model, "family", None)
    if data.decode == "text":
        return text_rows(data, model)
    if data.decode == "image":
        if family == "gpt":
            raise UserError(
                "data.decode=image gives float images, which a gpt model cannot read; use data.decode=image_tokens"
            )
        return ImageRows()
    rows = ImageTokenRows(model.seq_len, data.image_tokens.levels, data.image_tokens.num_classes)
    if model.vocab_size < rows.vocab_size:
        raise UserError(
            f"data.decode=image_tokens needs model.vocab_size >= {rows.vocab_size} ({rows.levels} grey levels, "
            f"{rows.num_classes} classes and 'no class'); it is {model.vocab_size}"
        )
    return rows


def text_rows(data: DataSpec, model: Any) -> TextRows:
    """Packed text rows, tokenized by data.tokenizer (bytes, or a tokenizer file) and checked against the model."""
    tokenizer = TextTokenizer.from_spec(data.tokenizer)
    if tokenizer.path is None:
        return TextRows(model.seq_len)
    if model.vocab_size < tokenizer.vocab_size:
        raise UserError(
            f"model.vocab_size: {model.vocab_size} is smaller than data.tokenizer's {tokenizer.vocab_size} tokens "
            f"({tokenizer.path}); set model.vocab_size: {tokenizer.vocab_size}"
        )
    return TextRows(model.seq_len, TokenizedText(tokenizer))


@dataclass
class WorkerBatch:
    worker: int
    stacked: Any  # RowFormat.stack of the rows: numpy, made a batch in the trainer's process
    state: dict[str, Any]  # the worker's slots after this batch
    skipped: int


@dataclass
class WorkerFailure:
    """A UserError in a worker, passed back as a value: DataLoader would re-raise it with a traceback
    pasted into the message. It reaches the trainer after the batches the worker made before it."""

    worker: int
    message: str


def array_bytes(stacked: Any) -> int:
    parts = stacked if isinstance(stacked, tuple) else (stacked,)
    return sum(part.nbytes for part in parts if isinstance(part, np.ndarray))


def keep_as_is(item: Any) -> Any:
    return item


class SlotWorkers(IterableDataset):
    """What each DataLoader process runs: the ShardStream of one worker's part of the rank's slots, its batches
    sent in groups of up to `group_batches` batches and `GROUP_BYTES`."""

    def __init__(
        self, make_stream: StreamFactory, start: dict[str, Any] | None, first: int, workers: int, group_batches: int
    ) -> None:
        super().__init__()
        self.make_stream, self.start, self.first, self.workers = make_stream, start, first, workers
        self.group_batches = group_batches

    def __iter__(self):
        info = get_worker_info()
        worker = (self.first + (info.id if info else 0)) % self.workers
        stream = self.make_stream(worker=worker)
        group: list[WorkerBatch | WorkerFailure] = []
        size = 0
        try:
            if self.start is not None:
                stream.load_state(self.start, check_shards=False)  # the trainer's process checked them
            while True:
                stacked = stream.rows.stack(stream.next_rows())
                group.append(WorkerBatch(worker, stacked, stream.position(), stream.skipped))
                size += array_bytes(stacked)
                if len(group) >= self.group_batches or size >= GROUP_BYTES:
                    yield group
                    group, size = [], 0
        except UserError as exc:
            yield [*group, WorkerFailure(worker, str(exc))]
        finally:
            stream.close()


class WorkerLoader:
    """A rank's batches from `num_workers` DataLoader processes, with an exact cursor of what was consumed."""

    def __init__(
        self,
        make_stream: StreamFactory,
        num_workers: int,
        rank: int,
        world_size: int,
        group_batches: int = GROUP_BATCHES,
    ) -> None:
        self.make_stream, self.num_workers = make_stream, num_workers
        self.rank, self.world_size, self.group_batches = rank, world_size, group_batches
        # Streams that are never read (no I/O until a row is taken): each worker's cursor before its first batch.
        self._initial = [make_stream(worker=worker) for worker in range(num_workers)]
        self.rows = self._initial[0].rows
        self._start: dict[str, Any] | None = None
        self._consumed: dict[int, WorkerBatch] = {}
        self._next_worker = 0
        self._batches: Any = None
        self._pending: list[deque[WorkerBatch | WorkerFailure]] = [deque() for _ in range(num_workers)]

    @property
    def skipped(self) -> int:
        """What every worker skipped: from its last batch, or from the cursor it resumes at."""
        return sum(
            self._consumed[w].skipped if w in self._consumed else self._initial[w].skipped
            for w in range(self.num_workers)
        )

    def __iter__(self) -> WorkerLoader:
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches = iter(self._data_loader())
        pending = self._pending[self._next_worker]
        while not pending:  # the DataLoader serves its workers in turn: each one's group within num_workers items
            group = next(self._batches)
            self._pending[group[0].worker].extend(group)
        item = pending.popleft()
        if isinstance(item, WorkerFailure):
            self.close()
            raise UserError(item.message)
        self._consumed[item.worker] = item
        self._next_worker = (item.worker + 1) % self.num_workers
        return self.rows.to_batch(item.stacked)

    def _data_loader(self) -> DataLoader:
        workers = SlotWorkers(self.make_stream, self._start, self._next_worker, self.num_workers, self.group_batches)
        return DataLoader(
            workers, batch_size=None, num_workers=self.num_workers, collate_fn=keep_as_is, prefetch_factor=2
        )

    def state(self) -> dict[str, Any]:
        parts = [
            self._consumed[w].state if w in self._consumed else self._initial[w].position()
            for w in range(self.num_workers)
        ]
        merged = merge_states(parts)
        merged["shards"] = self._initial[0].shard_identities()
        merged["next_slot"][next_worker_key(self.rank, self.world_size, self.num_workers)] = self._next_worker
        return merged

    def load_state(self, state: dict[str, Any]) -> None:
        self.close()
        for worker, stream in enumerate(self._initial):
            stream.load_state(state, check_shards=worker == 0)  # the workers' streams share one shard list
        self._start, self._consumed = state, {}
        key = next_worker_key(self.rank, self.world_size, self.num_workers)
        self._next_worker = int(state.get("next_slot", {}).get(key, 0)) % self.num_workers

    def close(self) -> None:
        self._batches = None  # the DataLoader iterator shuts its worker processes down when released
        self._pending = [deque() for _ in range(self.num_workers)]  # prefetched, not consumed: not in the cursor
