"""ShardStream: one rank's endless stream of packed token batches read from WebDataset shards.

Each canonical slot (see cursor.py) is an independent stream of documents; a document is its bytes plus a
0 separator, and documents are packed back to back into rows of `seq_len + 1` tokens. The rank takes rows
from its slots in turn. `state()` records where each slot's next row starts, so `load_state()` reopens only
the current shard of each slot and passes over the samples before the cursor without reading their data.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
import numpy as np
import torch
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from ember.data.build import expand_urls
from ember.data.cursor import (
    SlotCursor,
    merge_states,
    pointer_key,
    rank_slots,
    slot_shards,
)
from ember.errors import InternalError, UserError

__all__ = ["ShardStream", "UndecodableSample", "decode_text", "merge_states", "open_url"]

Opener = Callable[[str], BinaryIO]
Decoder = Callable[[dict[str, bytes]], np.ndarray]
Sample = tuple[int, str, dict[str, bytes]]
ON_ERROR = ("raise", "skip")
SEPARATOR = 0
# What a damaged shard raises while being read: tarfile's own errors, a short read, an I/O failure.
SHARD_ERRORS = (tarfile.TarError, EOFError, OSError)


class UndecodableSample(ValueError):
    """A decoder cannot turn this sample into tokens."""


def open_url(url: str) -> BinaryIO:
    """Open a shard for reading: a local path, file://, http(s)://, or any other fsspec URL."""
    return fsspec.open(url, "rb").open()


def decode_text(sample: dict[str, bytes]) -> np.ndarray:
    """A text sample's bytes as tokens 0..255, ended by the document separator."""
    data = sample.get("txt")
    if data is None:
        raise UndecodableSample(f"no .txt member (has {sorted(sample)})")
    tokens = np.empty(len(data) + 1, dtype=np.uint8)
    tokens[:-1] = np.frombuffer(data, dtype=np.uint8)
    tokens[-1] = SEPARATOR
    return tokens


class SampleCounter:
    """`select_files` predicate for webdataset's tar iterator: numbers samples by key as members go by, and
    selects only those from `start` on, so earlier samples are passed over without reading their data."""

    def __init__(self, start: int) -> None:
        self.start, self.index, self.key = start, -1, ""

    def __call__(self, member: str) -> bool:
        key, _ = base_plus_ext(member)
        if key is None:
            return False
        if key != self.key:
            self.key, self.index = key, self.index + 1
        return self.index >= self.start


def iter_shard_samples(stream: BinaryIO, counter: SampleCounter) -> Iterator[Sample]:
    """(index, key, {suffix: bytes}) for each sample of a tar from `counter.start` on."""
    current: Sample | None = None
    for member in tar_file_iterator(stream, select_files=counter):
        if current is None or current[0] != counter.index:
            if current is not None:
                yield current
            current = (counter.index, counter.key, {})
        current[2][base_plus_ext(member["fname"])[1].lower()] = member["data"]
    if current is not None:
        yield current


@dataclass(frozen=True)
class ShardSource:
    """What every slot reader shares: the shard list, the order's parameters, and how to read."""

    urls: tuple[str, ...]
    num_slots: int
    seed: int
    opener: Opener
    decode: Decoder
    on_error: str

    def shards_per_slot(self, slot: int) -> int:
        return len(range(slot, len(self.urls), self.num_slots))

    def shard_url(self, slot: int, cursor: SlotCursor) -> str:
        order = slot_shards(len(self.urls), self.num_slots, self.seed, cursor.epoch, slot)
        return self.urls[order[cursor.shard_pos]]


class SlotReader:
    """One slot's endless token stream; `cursor` always points at the next token it will hand out."""

    def __init__(self, source: ShardSource, slot: int, cursor: SlotCursor) -> None:
        self.source, self.slot = source, slot
        self.skipped = 0
        self._url = ""
        self._file: BinaryIO | None = None
        self._samples: Iterator[Sample] | None = None
        self._counter = SampleCounter(0)
        self.reset(cursor)

    def reset(self, cursor: SlotCursor) -> None:
        self.close()
        self.cursor = cursor
        self._tokens: np.ndarray | None = None

    def take(self, count: int) -> np.ndarray:
        """The next `count` tokens, crossing documents, shards and epochs as needed."""
        pieces = []
        while count > 0:
            tokens = self._current_tokens()
            start = self.cursor.byte_offset
            piece = tokens[start : start + count]
            pieces.append(piece)
            count -= len(piece)
            self.cursor.byte_offset += len(piece)
            if self.cursor.byte_offset == len(tokens):
                self._tokens = None
                self.cursor.next_sample(self.cursor.sample_index + 1)
        self._current_tokens()  # so a saved cursor names a real sample, never the end of a shard
        return np.concatenate(pieces)

    def _current_tokens(self) -> np.ndarray:
        shard_ends = 0
        while self._tokens is None:
            if self._samples is None:
                self._open_shard()
            item = self._next_sample()
            if item is not None:
                index, key, sample = item
                self.cursor.next_sample(index)
                self._tokens = self._decode(key, sample)
                continue
            self.close()
            self.cursor.next_shard(self.source.shards_per_slot(self.slot))
            shard_ends += 1
            if shard_ends > self.source.shards_per_slot(self.slot):
                raise UserError(f"slot {self.slot} read a whole epoch of shards without one usable sample")
        return self._tokens

    def _open_shard(self) -> None:
        self._url = self.source.shard_url(self.slot, self.cursor)
        self._counter = SampleCounter(self.cursor.sample_index)
        try:
            self._file = self.source.opener(self._url)
        except SHARD_ERRORS as exc:
            self._fail("cannot open the shard", exc)
            self._samples = iter(())
            return
        self._samples = iter_shard_samples(self._file, self._counter)

    def _next_sample(self) -> Sample | None:
        try:
            return next(self._samples, None)
        except SHARD_ERRORS as exc:
            self._fail(f"corrupt or truncated shard at sample {self._counter.key!r}", exc)
            return None  # skip the rest of this shard

    def _decode(self, key: str, sample: dict[str, bytes]) -> np.ndarray | None:
        try:
            return self.source.decode(sample)
        except UndecodableSample as exc:
            self._fail(f"cannot decode sample {key!r}", exc)
            return None

    def _fail(self, what: str, exc: BaseException) -> None:
        if self.source.on_error == "raise":
            reason = str(exc).split(" @ <")[0]  # webdataset appends the file object's repr; the URL says more
            raise UserError(
                f"{self._url}: {what} ({reason}). Rebuild or remove the shard, or set data.on_error=skip."
            ) from exc
        self.skipped += 1

    def close(self) -> None:
        if self._samples is not None and hasattr(self._samples, "close"):
            self._samples.close()
        if self._file is not None:
            self._file.close()
        self._samples, self._file = None, None


class ShardStream:
    """A rank's batches: `torch.long` tensors of shape [micro_batch, seq_len + 1], rows taken in turn from the
    rank's slots. Iterating never ends; `state()` / `load_state()` resume it exactly."""

    def __init__(
        self,
        urls: str | list[str],
        *,
        seq_len: int,
        micro_batch: int,
        rank: int,
        world_size: int,
        num_slots: int = 8,
        seed: int = 0,
        on_error: str = "raise",
        opener: Opener = open_url,
        decode: Decoder = decode_text,
    ) -> None:
        if on_error not in ON_ERROR:
            raise UserError(f"data.on_error must be one of {ON_ERROR}, not {on_error!r}")
        if seq_len < 1 or micro_batch < 1:
            raise InternalError(f"seq_len ({seq_len}) and micro_batch ({micro_batch}) must be positive")
        self.source = ShardSource(tuple(expand_urls(urls)), num_slots, seed, opener, decode, on_error)
        self.seq_len, self.micro_batch, self.rank, self.world_size = seq_len, micro_batch, rank, world_size
        self.slots = rank_slots(len(self.source.urls), num_slots, rank, world_size)
        self._readers = {slot: SlotReader(self.source, slot, SlotCursor()) for slot in self.slots}
        self._next_slot = 0

    @property
    def skipped(self) -> int:
        """Samples or shard remainders passed over under on_error=skip."""
        return sum(reader.skipped for reader in self._readers.values())

    def __iter__(self) -> ShardStream:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def next_batch(self) -> torch.Tensor:
        rows = [self._next_row() for _ in range(self.micro_batch)]
        return torch.from_numpy(np.stack(rows)).long()

    def _next_row(self) -> np.ndarray:
        reader = self._readers[self.slots[self._next_slot]]
        self._next_slot = (self._next_slot + 1) % len(self.slots)
        return reader.take(self.seq_len + 1)

    def state(self) -> dict[str, Any]:
        """This rank's cursor, JSON-serialisable; merge all ranks' with `merge_states` before saving."""
        return {
            **self._identity(),
            "slots": {str(slot): reader.cursor.to_dict() for slot, reader in self._readers.items()},
            "next_slot": {pointer_key(self.rank, self.world_size): self._next_slot},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume from a merged state; this rank takes its own slots from it, whatever world size wrote it."""
        self._check_identity(state)
        for slot, reader in self._readers.items():
            if str(slot) not in state["slots"]:
                raise InternalError(
                    f"the saved data cursor lacks slot {slot}; were all ranks' states merged?"
                )
            reader.reset(SlotCursor.from_dict(state["slots"][str(slot)]))
        # The turn pointer only means something in the world size that saved it; elsewhere start at 0.
        pointer = int(state.get("next_slot", {}).get(pointer_key(self.rank, self.world_size), 0))
        self._next_slot = pointer % len(self.slots)

    def _identity(self) -> dict[str, int]:
        return {
            "seed": self.source.seed,
            "num_slots": self.source.num_slots,
            "num_shards": len(self.source.urls),
        }

    def _check_identity(self, state: dict[str, Any]) -> None:
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise UserError(
                    f"the saved data cursor has {key}={state.get(key)} but this run has {value}; "
                    "resume with the same data.seed, data.num_slots and shard list, or start a new run."
                )

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
