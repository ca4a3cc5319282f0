"""Shards on HTTP(S) servers and object stores: a read stream that survives transient failures.

A dropped connection, a body cut short, a read that stalls longer than `read_timeout_s`, or an HTTP 408/429/5xx
answer is retried up to `tries` times with exponential backoff, and the retry continues at the byte already
read (a Range request, or a seek on an object store), so a shard is never read twice from its start. A slow but
live server is never cut off: the timeout applies between chunks, not to the whole shard. After the last try,
or on a permanent answer (404, 403, ...), `ShardReadError` - an OSError, so `data.on_error` decides what
happens - names the URL, the byte and the last cause.

HTTP is read with the standard library rather than fsspec/aiohttp: aiohttp's errors are not OSError, and its
session has a 300 s total timeout that kills a long shard on a slow but working link.
"""

from __future__ import annotations

import http.client
import io
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import fsspec

log = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
try:  # object stores read through fsspec raise aiohttp's errors, which are not OSError
    from aiohttp import ClientError as _AiohttpError

    TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException, _AiohttpError)
except ImportError:  # pragma: no cover - aiohttp comes with fsspec's http support
    TRANSIENT_ERRORS = (OSError, http.client.HTTPException)


class ShardReadError(OSError):
    """A shard that cannot be read: a permanent answer, or a transient failure that outlived every retry."""


# OSErrors that another try would only repeat.
PERMANENT_ERRORS = (ShardReadError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a remote shard read tries. The defaults ride out a server restart (~30 s of backoff)."""

    tries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 16.0
    read_timeout_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1, 2, ...): doubling, capped."""
        return min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s)


Connect = Callable[[int], tuple[BinaryIO, int | None]]  # byte offset -> (stream there, total size if known)


class ResumingReader(io.RawIOBase):
    """A remote shard's bytes from front to back (or from a seek), reconnecting at the current byte after a
    transient failure. `connect(offset)` opens the shard at `offset`."""

    def __init__(self, url: str, connect: Connect, policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep):
        super().__init__()
        self.url, self.connect, self.policy, self.sleep = url, connect, policy, sleep
        self.position, self.size = 0, None
        self.retried = 0  # transient failures recovered from, over the stream's life
        self._stream: BinaryIO | None = None
        self._retrying(self._open)  # a missing shard fails here, when the shard is opened

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or offset < 0:
            raise OSError(f"{self.url}: only absolute seeks are supported")
        if offset != self.position:
            self._drop()
            self.position = offset
        return offset

    def readinto(self, buffer) -> int:
        return self._retrying(lambda: self._read_into(buffer))

    def _read_into(self, buffer) -> int:
        if self._stream is None:
            self._open()
        count = self._stream.readinto(buffer) if hasattr(self._stream, "readinto") else self._copy_into(buffer)
        if not count and len(buffer) and self.size is not None and self.position < self.size:
            raise http.client.IncompleteRead(b"", self.size - self.position)  # the body was cut short
        self.position += count
        return count

    def _copy_into(self, buffer) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _open(self) -> None:
        self._stream, size = self.connect(self.position)
        self.size = self.size if size is None else size

    def _retrying(self, action: Callable[[], int | None]) -> int | None:
        failures = 0
        while True:
            try:
                return action()
            except PERMANENT_ERRORS:
                self._drop()
                raise
            except TRANSIENT_ERRORS as exc:
                self._drop()
                failures += 1
                if failures >= self.policy.tries:
                    raise ShardReadError(
                        f"gave up after {failures} tries at byte {self.position}: {describe(exc)}"
                    ) from exc
                self.retried += 1
                log.warning("%s: %s at byte %d; retry %d of %d", self.url, describe(exc), self.position, failures,
                            self.policy.tries - 1)
                self.sleep(self.policy.delay(failures))

    def _drop(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except TRANSIENT_ERRORS:
                pass  # the connection is already broken; closing it must not hide why
        self._stream = None

    def close(self) -> None:
        self._drop()
        super().close()


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def http_connect(url: str, timeout_s: float) -> Connect:
    """Open `url` at a byte offset with a Range request. A server that ignores Range sends the whole body; the
    bytes before the offset are then read and dropped, which is slower but still correct."""

    def connect(offset: int) -> tuple[BinaryIO, int | None]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code in TRANSIENT_STATUS:
                raise http.client.HTTPException(f"HTTP {exc.code} {exc.reason}") from exc
            raise ShardReadError(f"HTTP {exc.code} {exc.reason}") from exc
        length = response.length  # of this body; None when the server does not say
        if offset and response.status != 206:  # the whole shard came back
            pass_over(response, offset)
            return response, length
        return response, None if length is None else length + offset

    return connect


def pass_over(stream: BinaryIO, count: int) -> None:
    while count > 0:
        data = stream.read(min(count, 1 << 20))
        if not data:
            raise http.client.IncompleteRead(b"", count)
        count -= len(data)


def fsspec_connect(url: str) -> Connect:
    """Open an object-store URL (s3://, gs://, ...) at a byte offset through fsspec."""

    def connect(offset: int) -> tuple[BinaryIO, int | None]:
        stream = fsspec.open(url, "rb").open()
        if offset:
            stream.seek(offset)
        return stream, getattr(stream, "size", None)

    return connect


def open_remote(url: str, policy: RetryPolicy | None = None) -> ResumingReader:
    """A retrying reader of an http(s):// or object-store shard."""
    policy = policy or RetryPolicy()
    if url.startswith(("http://", "https://")):
        return ResumingReader(url, http_connect(url, policy.read_timeout_s), policy)
    return ResumingReader(url, fsspec_connect(url), policy)


def http_head(url: str, policy: RetryPolicy | None = None) -> dict[str, str]:
    """The headers of a HEAD request (size and change markers of a shard without shards.json)."""
    policy = policy or RetryPolicy()
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=policy.read_timeout_s) as response:
        return dict(response.headers.items())
