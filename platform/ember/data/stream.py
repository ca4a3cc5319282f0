"""ShardStream: one rank's (or one DataLoader worker's) endless stream of batches read from WebDataset shards.

Each canonical slot (see cursor.py) is an independent sequence of samples; the stream takes rows from its
slots in turn and a `RowFormat` (formats.py) turns them into a batch. `state()` records where each slot's
next row starts (down to the sample's byte offset in its tar), so `load_state()` reopens only the current
shard of each slot and seeks to the sample (or, on a stream that cannot seek, passes over the samples
before it without reading their data): resume costs about the same at 1% or 99% of an epoch.

Guarantee on a new world size (elastic resume): each slot reads, in its epoch e, the shards
`order(seed, e)[slot::num_slots]` in tar order, and its cursor moves only when a row is taken from it. A
resume on any number of ranks or DataLoader workers continues every slot from its saved cursor, so within
each slot's epoch every sample of its shards is delivered exactly once (skipped ones under on_error=skip
excepted), and since the slots' shards partition the shard list, every sample key is seen exactly once
over one epoch of every slot. Epochs are per slot: a slot with fewer samples may start its next epoch
while others finish theirs. Packed text may split a document over rows; its bytes are still delivered once.

Unequal slots: with N shards over S slots and N % S != 0, slots read N // S or N // S + 1 shards per epoch,
yet slots yield rows at (about) the same rate: a rank's batches take rows from its slots in turn, and every
rank takes as many. So "an epoch" is each slot's own (`SampleId.epoch` names it): the rows tagged with epoch
e hold every sample of the shard list exactly once, and all of them have been read once every slot has
yielded as many rows as the fullest slot has samples - by then the smaller slots have started epoch e + 1
(with one rank reading all S slots: after S x that many rows). Balancing slots by reading them at unequal
rates would tie the order to the world size and break exact elastic resume, so the stream warns instead; a
shard count that is a multiple of data.num_slots makes the epochs even.
Which rows form a batch does depend on the world size and worker count; what each slot yields does not.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.data.build import expand_urls
from ember.data.cursor import (
    SlotCursor,
    merge_states,
    mix_choice,
    pointer_key,
    rank_slots,
    slot_is_empty,
    worker_slots,
)
from ember.data.formats import RowFormat, TextRows, UndecodableSample, collate, decode_text
from ember.data.identity import ShardIdentity, check_shard_identities, shard_identities
from ember.data.reader import ON_ERROR, Decoder, Opener, ShardSource, SlotReader, open_url
from ember.errors import InternalError, UserError

log = logging.getLogger(__name__)

__all__ = [
    "ShardStream",
    "UndecodableSample",
    "WeightedUrls",
    "decode_text",
    "merge_states",
    "open_url",
]


@dataclass(frozen=True)
class WeightedUrls:
    """One source of a mixture: its shard URLs and its share of the rows."""

    urls: str | list[str]
    weight: float = 1.0


class SlotRows:
    """One canonical slot's rows. With one source they are that source's; with several, row n of the slot
    comes from the source `mix_choice` picks (a source without a shard in this slot gets weight 0).

    With a shuffle buffer of B rows the slot reads B rows at a time and yields them in an order seeded by
    (seed, slot, window number). webdataset's `shuffle(n)` keeps a rolling buffer whose contents would have
    to go into the checkpoint (and it has no resume at all); a fixed window needs only the cursor where the
    window starts and how many of its rows were taken, and a resume re-reads at most B rows. Written here
    because no library offers a shuffle that resumes exactly."""

    def __init__(
        self, sources: list[ShardSource], weights: tuple[float, ...], slot: int, seed: int, shuffle: int = 0
    ) -> None:
        self.slot, self.seed, self.row, self.shuffle = slot, seed, 0, shuffle
        self.readers = [
            None if slot_is_empty(len(source.urls), source.num_slots, slot) else SlotReader(source, slot)
            for source in sources
        ]
        self.weights = tuple(weight if reader else 0.0 for weight, reader in zip(weights, self.readers, strict=True))
        self.window: list[Any] = []  # the current window's rows, in the order they are yielded
        self.window_number, self.taken = 0, 0
        self.window_start: dict[str, Any] | None = None  # the readers' cursor where the window begins

    @property
    def skipped(self) -> int:
        return sum(reader.skipped for reader in self.readers if reader)

    def next_row(self, rows: RowFormat) -> Any:
        if not self.shuffle:
            return self._read_row(rows)
        if self.taken == len(self.window):
            self._fill_window(rows)
        self.taken += 1
        return self.window[self.taken - 1]

    def _read_row(self, rows: RowFormat) -> Any:
        reader = self._reader_for(self.row)
        self.row += 1
        return reader.take(rows.row_length) if rows.packs else reader.take_sample()

    def _fill_window(self, rows: RowFormat) -> None:
        if self.window:  # the previous window is used up
            self.window_number += 1
        self.window_start = self._read_state()
        self.window = [self._read_row(rows) for _ in range(self.shuffle)]
        digest = hashlib.sha256(f"ember-shuffle:{self.seed}:{self.slot}:{self.window_number}".encode()).digest()
        random.Random(int.from_bytes(digest[:8], "big")).shuffle(self.window)
        self.taken = 0

    def next_packed_rows(self, count: int, length: int) -> np.ndarray:
        """`count` consecutive packed rows in one read: the same tokens as `count` calls of next_row (one
        source and no shuffle only: otherwise consecutive rows may come from different places)."""
        self.row += count
        return self.readers[0].take(count * length).reshape(count, length)

    def _reader_for(self, row: int) -> SlotReader:
        if len(self.readers) == 1:
            return self.readers[0]
        return self.readers[mix_choice(self.seed, self.slot, row, self.weights)]

    def state(self) -> dict[str, Any]:
        if not self.shuffle:
            return self._read_state()
        if self.taken == len(self.window):  # between windows: the next one starts where the readers are
            number = self.window_number + 1 if self.window else self.window_number
            return {"window_start": self._read_state(), "window": number, "taken": 0}
        return {"window_start": self.window_start, "window": self.window_number, "taken": self.taken}

    def load(self, raw: dict[str, Any], rows: RowFormat | None = None) -> None:
        if not self.shuffle:
            self._load_read_state(raw)
            return
        if "window_start" not in raw:
            raise UserError("the saved data cursor was written without data.shuffle_buffer; resume with the same "
                            "data.shuffle_buffer, or start a new run")
        self._load_read_state(raw["window_start"])
        self.window, self.window_number, self.taken = [], int(raw["window"]), 0
        if int(raw["taken"]):
            if rows is None:
                raise InternalError("resuming inside a shuffle window needs the row format")
            self._fill_window(rows)  # the same rows in the same order: the window is a pure function of its start
            self.taken = int(raw["taken"])

    def _read_state(self) -> dict[str, Any]:
        if len(self.readers) == 1:
            return self.readers[0].cursor.to_dict()
        cursors = [reader.cursor.to_dict() if reader else None for reader in self.readers]
        return {"row": self.row, "sources": cursors}

    def _load_read_state(self, raw: dict[str, Any]) -> None:
        if len(self.readers) == 1:
            self.readers[0].reset(SlotCursor.from_dict(raw))
            return
        self.row = int(raw["row"])
        for reader, cursor in zip(self.readers, raw["sources"], strict=True):
            if reader:
                reader.reset(SlotCursor.from_dict(cursor))

    def close(self) -> None:
        for reader in self.readers:
            if reader:
                reader.close()


class ShardStream:
    """A rank's batches, rows taken in turn from its slots; iterating never ends and `state()` /
    `load_state()` resume it exactly. Text (the default, `seq_len` given): `torch.long` [micro_batch,
    seq_len + 1]; other decodes: whatever their `RowFormat.to_batch` builds. `urls` is one shard list, or
    several `WeightedUrls` to mix. `worker`/`num_workers`: read only that DataLoader worker's part."""

    def __init__(
        self,
        urls: str | list[str] | Sequence[WeightedUrls],
        *,
        micro_batch: int,
        rank: int,
        world_size: int,
        seq_len: int | None = None,
        rows: RowFormat | None = None,
        num_slots: int = 8,
        seed: int = 0,
        on_error: str = "raise",
        opener: Opener = open_url,
        decode: Decoder | None = None,
        worker: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 0,
    ) -> None:
        if on_error not in ON_ERROR:
            raise UserError(f"data.on_error must be one of {ON_ERROR}, not {on_error!r}")
        self.rows = rows or TextRows(seq_len or 0, decode or decode_text)
        if micro_batch < 1 or (self.rows.packs and self.rows.row_length < 2):
            raise InternalError(f"seq_len ({seq_len}) and micro_batch ({micro_batch}) must be positive")
        weighted = as_weighted(urls)
        self.sources = [
            ShardSource(tuple(expand_urls(w.urls)), num_slots, seed, opener, self.rows.decode, on_error)
            for w in weighted
        ]
        self.weights = tuple(float(w.weight) for w in weighted)
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.worker, self.num_workers, self.shuffle_buffer = worker, num_workers, shuffle_buffer
        most_shards = max(len(source.urls) for source in self.sources)
        warn_about_thin_sources(self.sources, min(most_shards, num_slots))
        if rank == 0 and worker == 0:  # once per job (and per DataLoader process), not once per stream
            warn_about_unequal_slots(self.sources, self._source_labels())
        self.slots = worker_slots(rank_slots(most_shards, num_slots, rank, world_size), worker, num_workers)
        self._slot_rows = {
            slot: SlotRows(self.sources, self.weights, slot, seed, shuffle_buffer) for slot in self.slots
        }
        self._next_slot = 0
        self._shards: list[list[ShardIdentity]] | None = None

    @property
    def skipped(self) -> int:
        """Samples or shard remainders passed over under on_error=skip."""
        return sum(slot.skipped for slot in self._slot_rows.values())

    def __iter__(self) -> ShardStream:
        return self

    def __next__(self) -> Any:
        return self.next_batch()

    def next_batch(self) -> Any:
        return collate(self.rows, self.next_rows())

    def next_rows(self) -> list[Any]:
        """The next batch's rows before collation (what DataLoader workers send: compact, no tensors)."""
        turns = [self.slots[(self._next_slot + i) % len(self.slots)] for i in range(self.micro_batch)]
        self._next_slot = (self._next_slot + self.micro_batch) % len(self.slots)
        if self.rows.packs and len(self.sources) == 1 and not self.shuffle_buffer:
            return self._packed_rows(turns)
        return [self._slot_rows[slot].next_row(self.rows) for slot in turns]

    def _packed_rows(self, turns: list[int]) -> list[np.ndarray]:
        """Each slot's rows of the batch taken in one read, then dealt back in turn order (a slot's rows are
        consecutive in its stream, so the rows are the same; the per-row Python work is not)."""
        runs = {
            slot: iter(self._slot_rows[slot].next_packed_rows(count, self.rows.row_length))
            for slot, count in Counter(turns).items()
        }
        return [next(runs[slot]) for slot in turns]

    @property
    def pointer_key(self) -> str:
        return pointer_key(self.rank, self.world_size, self.worker, self.num_workers)

    def state(self) -> dict[str, Any]:
        """This stream's cursor, JSON-serialisable; merge all ranks' with `merge_states` before saving. It pins
        the shards' identity (identity.py), looked up once per stream."""
        return {**self.position(), "shards": self.shard_identities()}

    def position(self) -> dict[str, Any]:
        """The cursor without the shards' identity: what DataLoader workers send with every batch."""
        return {
            **self._identity(),
            "slots": {str(slot): rows.state() for slot, rows in self._slot_rows.items()},
            "next_slot": {self.pointer_key: self._next_slot},
        }

    def shard_identities(self) -> list[list[ShardIdentity]]:
        if self._shards is None:
            self._shards = [shard_identities(source.urls) for source in self.sources]
        return self._shards

    def load_state(self, state: dict[str, Any], check_shards: bool = True) -> None:
        """Resume from a merged state; this stream takes its own slots from it, whatever world size wrote it.
        `check_shards=False`: the caller has checked the shards' identity already (the DataLoader workers)."""
        self._check_identity(state)
        if check_shards:
            check_shard_identities(state.get("shards"), self.shard_identities(), self._source_labels())
        for slot, rows in self._slot_rows.items():
            if str(slot) not in state["slots"]:
                raise InternalError(f"the saved data cursor lacks slot {slot}; were all ranks' states merged?")
            rows.load(state["slots"][str(slot)], self.rows)
        # The turn pointer only means something in the world size that saved it; elsewhere start at 0.
        self._next_slot = int(state.get("next_slot", {}).get(self.pointer_key, 0)) % len(self.slots)

    def _source_labels(self) -> list[str]:
        if len(self.sources) == 1:
            return ["data.train.urls"]
        return [f"data.sources[{i}]" for i in range(len(self.sources))]

    def _identity(self) -> dict[str, Any]:
        if len(self.sources) == 1:
            num_shards: int | list[int] = len(self.sources[0].urls)
            extra = {}
        else:
            num_shards = [len(source.urls) for source in self.sources]
            extra = {"weights": list(self.weights)}
        if self.shuffle_buffer:  # absent when off, so cursors written before the buffer existed still load
            extra["shuffle_buffer"] = self.shuffle_buffer
        return {"seed": self.sources[0].seed, "num_slots": self.sources[0].num_slots, "num_shards": num_shards, **extra}

    def _check_identity(self, state: dict[str, Any]) -> None:
        identity = {"shuffle_buffer": 0, **self._identity()}
        for key, value in identity.items():
            if state.get(key, 0 if key == "shuffle_buffer" else None) != value:
                raise UserError(
                    f"the saved data cursor has {key}={state.get(key)} but this run has {value}; resume with the "
                    "same data.seed, data.num_slots, data.shuffle_buffer, shard lists and weights, or start a new run."
                )

    def close(self) -> None:
        for rows in self._slot_rows.values():
            rows.close()


def warn_about_thin_sources(sources: list[ShardSource], filled_slots: int) -> None:
    """A source with fewer shards than the filled slots is absent from some slots, where the other sources
    share its rows: the mixture's weights then hold only approximately."""
    for number, source in enumerate(sources if len(sources) > 1 else []):
        if len(source.urls) < filled_slots:
            log.warning(
                "data.sources[%d] has %d shard(s) for %d slots: its weight holds only approximately; give it "
                "at least data.num_slots shards",
                number,
                len(source.urls),
                filled_slots,
            )


def warn_about_unequal_slots(sources: list[ShardSource], labels: list[str]) -> None:
    """Slots with unequal shard counts make per-slot epochs drift apart (see the module's docstring)."""
    for label, source in zip(labels, sources, strict=True):
        shards, slots = len(source.urls), source.num_slots
        if shards > slots and shards % slots:
            log.warning(
                "%s has %d shards for data.num_slots=%d: slots read %d or %d shards per epoch at the same row rate, "
                "so smaller slots start their next epoch while others finish (every sample is still read once per "
                "slot epoch). Use a multiple of %d shards for even epochs.",
                label, shards, slots, shards // slots, shards // slots + 1, slots,
            )


def as_weighted(urls: str | list[str] | Sequence[WeightedUrls]) -> list[WeightedUrls]:
    """One shard list as a single source of weight 1; a mixture as given, after checking its weights."""
    if isinstance(urls, str) or not urls or not isinstance(urls[0], WeightedUrls):
        return [WeightedUrls(urls)]
    if any(w.weight < 0 for w in urls) or not any(w.weight > 0 for w in urls):
        raise UserError(f"data.sources weights must be >= 0 with at least one > 0, got {[w.weight for w in urls]}")
    return list(urls)
