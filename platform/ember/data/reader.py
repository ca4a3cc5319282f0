"""One slot of one shard list, read sample by sample: the piece under every stream, with the error policy.

A `SlotReader` holds a `SlotCursor` that always names the next thing it will hand out, so a saved cursor
reopens only the current shard and jumps to the sample's byte offset when the stream can seek (local files,
object stores), or else passes over the samples before it without reading their data (HTTP streams, pipes).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
import numpy as np
import webdataset
from webdataset.tariterators import base_plus_ext

from ember.data.build import local_path
from ember.data.cursor import SlotCursor, slot_shards
from ember.data.formats import SampleId, UndecodableSample
from ember.data.remote import RetryPolicy, open_remote
from ember.errors import UserError

Opener = Callable[[str], BinaryIO]
Decoder = Callable[[dict[str, bytes]], Any]
Sample = tuple[int, str, dict[str, bytes], int]  # index, key, {suffix: bytes}, tar offset (0: unknown)
ON_ERROR = ("raise", "skip")
# What a damaged shard raises while being read: tarfile's own errors, a short read, an I/O failure.
SHARD_ERRORS = (tarfile.TarError, EOFError, OSError)
BLOCK = tarfile.BLOCKSIZE
WEBDATASET_META = re.compile(r"__[^/]*__($|/)")  # webdataset's own rule (tariterators.skip_meta)
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: their own trailers catch a cut


def open_url(url: str, retry: RetryPolicy | None = None) -> BinaryIO:
    """Open a shard for reading: a path, file://, a webdataset pipe:, or a remote URL (http(s)://, s3://, any
    other fsspec URL), which is read with retries that continue at the byte already read (remote.py)."""
    if url.startswith("pipe:"):
        return webdataset.gopen(url, "rb")
    if local_path(url) is not None:
        return fsspec.open(url, "rb").open()
    return open_remote(url, retry)


class EndCheckedFile:
    """A shard's byte stream that keeps its first and last block. tarfile reads a tar cut at a member
    boundary as a normal end of archive; a complete tar ends in zero blocks, which tells the two apart."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.head, self.tail = raw, b"", b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if len(self.head) < BLOCK:
            self.head += data[: BLOCK - len(self.head)]
        self.tail = (self.tail + data)[-BLOCK:]
        return data

    def ends_cleanly(self) -> bool:
        """Read what tarfile left (end padding) and check the last block; compressed tars always pass."""
        while self.read(1 << 16):
            pass
        return self.head.startswith(COMPRESSED_MAGIC) or self.tail == bytes(BLOCK)

    def close(self) -> None:
        self.raw.close()


class SampleCounter:
    """Numbers samples by key as tar members go by, and selects only those from `start` on, so earlier
    samples are passed over without reading their data."""

    def __init__(self, start: int) -> None:
        self.start, self.index, self.key = start, -1, ""

    def jumped_to_start(self) -> None:
        """The stream was moved to sample `start`'s first member: the next key seen is that sample."""
        self.index = self.start - 1

    def __call__(self, member: str) -> bool:
        key, _ = base_plus_ext(member)
        if key is None:
            return False
        if key != self.key:
            self.key, self.index = key, self.index + 1
        return self.index >= self.start


def seek_to(stream: BinaryIO, offset: int) -> bool:
    """Move to `offset` when it is known and the stream can seek; False: read from the start instead."""
    if offset <= 0 or not getattr(stream, "seekable", lambda: False)():
        return False
    try:
        stream.seek(offset)
    except (OSError, ValueError):
        return False
    return True


def iter_shard_samples(stream: BinaryIO, counter: SampleCounter, offset: int = 0) -> Iterator[Sample]:
    """Each sample of a tar from `counter.start` on (`offset`: where that sample starts, 0 if unknown), with
    the offset of its first header; EOFError for a tar that was cut short (its last, perhaps partial, sample
    is then not yielded). Members named like `__meta__` are webdataset metadata, not sample parts."""
    base = offset if seek_to(stream, offset) else 0
    if base:
        counter.jumped_to_start()
    checked = EndCheckedFile(stream)
    current: Sample | None = None
    with tarfile.open(fileobj=checked, mode="r|*") as tar:
        for info in tar:
            tar.members = []  # a stream never goes back; the list would grow with the shard
            if not info.isreg() or WEBDATASET_META.match(info.name) or not counter(info.name):
                continue
            data = tar.extractfile(info).read()
            if current is None or current[0] != counter.index:
                if current is not None:
                    yield current
                at = 0 if checked.head.startswith(COMPRESSED_MAGIC) else base + info.offset
                current = (counter.index, counter.key, {}, at)
            current[2][base_plus_ext(info.name)[1].lower()] = data
    if not checked.ends_cleanly():
        raise EOFError("the tar stops without its end-of-archive blocks")
    if current is not None:
        yield current


@dataclass(frozen=True)
class ShardSource:
    """What every slot reader of one shard list shares: the shards, the order's parameters, how to read."""

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
    """One slot's endless sequence of decoded samples; `cursor` always points at the next thing handed out."""

    def __init__(self, source: ShardSource, slot: int, cursor: SlotCursor | None = None) -> None:
        self.source, self.slot = source, slot
        self._url = ""
        self._file: BinaryIO | None = None
        self._samples: Iterator[Sample] | None = None
        self._counter = SampleCounter(0)
        self.reset(cursor or SlotCursor())

    @property
    def skipped(self) -> int:
        """Samples or shard remainders passed over under on_error=skip; kept in the cursor, so it survives a resume."""
        return self.cursor.skipped

    def reset(self, cursor: SlotCursor) -> None:
        self.close()
        self.cursor = cursor
        self._item: Any = None
        self._id = SampleId(0, "")

    def take(self, count: int) -> np.ndarray:
        """The next `count` tokens of packed documents, crossing documents, shards and epochs as needed."""
        pieces = []
        while count > 0:
            tokens = self.current()
            start = self.cursor.byte_offset
            if start and start >= len(tokens):
                self._fail_short_sample(len(tokens))
            piece = tokens[start : start + count]
            pieces.append(piece)
            count -= len(piece)
            self.cursor.byte_offset += len(piece)
            if self.cursor.byte_offset == len(tokens):
                self._advance()
        self.current()  # so a saved cursor names a real sample, never the end of a shard
        return np.concatenate(pieces)

    def take_sample(self) -> tuple[SampleId, Any]:
        """The next whole decoded sample and its id."""
        item, sample_id = self.current(), self._id
        self._advance()
        self.current()
        return sample_id, item

    def _advance(self) -> None:
        self._item = None
        self.cursor.next_sample(self.cursor.sample_index + 1)

    def current(self) -> Any:
        """The decoded sample under the cursor, reading on through skipped samples, shards and epochs."""
        shard_ends = 0
        while self._item is None:
            if self._samples is None:
                self._open_shard()
            item = self._next_sample()
            if item is not None:
                index, key, sample, offset = item
                self.cursor.next_sample(index, offset)
                self._id = SampleId(self.cursor.epoch, key)
                self._item = self._decode(key, sample)
                continue
            self.close()
            self.cursor.next_shard(self.source.shards_per_slot(self.slot))
            shard_ends += 1
            # The first end may be that of a shard whose samples earlier calls used: a full epoch more is needed.
            if shard_ends > self.source.shards_per_slot(self.slot) + 1:
                raise UserError(f"slot {self.slot} read a whole epoch of shards without one usable sample")
        return self._item

    def _open_shard(self) -> None:
        self._url = self.source.shard_url(self.slot, self.cursor)
        self._counter = SampleCounter(self.cursor.sample_index)
        try:
            self._file = self.source.opener(self._url)
        except SHARD_ERRORS as exc:
            self._fail("cannot open the shard", exc)
            self._samples = iter(())
            return
        self._samples = iter_shard_samples(self._file, self._counter, self.cursor.tar_offset)

    def _next_sample(self) -> Sample | None:
        try:
            return next(self._samples, None)
        except SHARD_ERRORS as exc:
            self._fail(f"corrupt or truncated shard at sample {self._counter.key!r}", exc)
            return None  # skip the rest of this shard

    def _decode(self, key: str, sample: dict[str, bytes]) -> Any:
        try:
            return self.source.decode(sample)
        except UndecodableSample as exc:
            self._fail(f"cannot decode sample {key!r}", exc)
            return None

    def _fail_short_sample(self, length: int) -> None:
        """A saved cursor inside a sample that is now shorter: the shard is not the one the cursor was saved on."""
        raise UserError(
            f"{self._url}: the data cursor points at token {self.cursor.byte_offset} of sample {self._id.key!r} "
            f"(number {self.cursor.sample_index}), but that sample has only {length} tokens: the shard changed since "
            "the checkpoint. Restore the shards the run was started with, or start a new run."
        )

    def _fail(self, what: str, exc: BaseException) -> None:
        if self.source.on_error == "raise":
            reason = str(exc).split(" @ <")[0]  # webdataset appends the file object's repr; the URL says more
            raise UserError(
                f"{self._url}: {what} ({reason}). Rebuild or remove the shard, or set data.on_error=skip."
            ) from exc
        self.cursor.skipped += 1

    def close(self) -> None:
        if self._samples is not None and hasattr(self._samples, "close"):
            self._samples.close()
        if self._file is not None:
            self._file.close()
        self._samples, self._file = None, None
