"""HTTP shards under faults injected by a real `http.server` on 127.0.0.1 at named points: a connection dropped
at a given byte, a stall, a number of 503 answers. Retries continue at the byte already read (Range requests),
give up with one clear error after the last try, and under on_error=skip the skip count is in the cursor."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest
import torch

from ember.data.reader import open_url
from ember.data.remote import RetryPolicy
from ember.data.stream import ShardStream
from ember.errors import UserError

FAST_RETRIES = RetryPolicy(tries=3, backoff_s=0.01, read_timeout_s=5.0)
ONE_SLOT = {"seq_len": 64, "micro_batch": 8, "num_slots": 1, "seed": 3}
SHARD = "/train-000000.tar"


@dataclass
class Faults:
    """What the server does wrong, per request path; it records every request as (path, Range header)."""

    drop_at: dict[str, int] = field(default_factory=dict)  # close the connection after this byte, once
    stall_at: dict[str, int] = field(default_factory=dict)  # stop sending at this byte until `release`, once
    unavailable: dict[str, int] = field(default_factory=dict)  # answer 503 this many times
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


class FaultyShardHandler(BaseHTTPRequestHandler):
    """Serves a folder with Range support, misbehaving as `faults` says."""

    folder: Path
    faults: Faults

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        faults = self.faults
        faults.requests.append((self.path, self.headers.get("Range")))
        if faults.unavailable.get(self.path, 0) > 0:
            faults.unavailable[self.path] -= 1
            self.send_error(503, "busy")
            return
        file = self.folder / self.path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self._send_body(data, start)

    def _send_body(self, data: bytes, start: int) -> None:
        faults = self.faults
        drop = faults.drop_at.pop(self.path, None)
        stall = faults.stall_at.pop(self.path, None)
        cut = drop if drop is not None else stall
        if cut is None:
            self.wfile.write(data[start:])
            return
        self.wfile.write(data[start:cut])
        self.wfile.flush()
        if stall is not None:
            faults.release.wait(30)  # the client gives up on this connection long before
        self.close_connection = True


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that stops reading mid-shard resets the connection: expected here, not worth a traceback


@pytest.fixture
def serve() -> Iterator[Callable[[Path, Faults], str]]:
    """serve(folder, faults) -> base URL of a real HTTP server thread on 127.0.0.1."""
    servers: list[tuple[QuietServer, Faults]] = []

    def start(folder: Path, faults: Faults) -> str:
        handler = type("Handler", (FaultyShardHandler,), {"folder": folder, "faults": faults})
        server = QuietServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append((server, faults))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, faults in servers:
        faults.release.set()
        server.shutdown()
        server.server_close()


def stream(urls: list[str], **options: object) -> ShardStream:
    opener = partial(open_url, retry=FAST_RETRIES)
    return ShardStream(urls, rank=0, world_size=1, opener=opener, **{**ONE_SLOT, **options})


def batches_until_end_of_shard(folder: Path) -> int:
    """Batches of ONE_SLOT that read train-000000.tar to its end."""
    return (folder / SHARD.lstrip("/")).stat().st_size // (8 * 65) + 2


def shard_requests(faults: Faults) -> list[str | None]:
    return [ranged for path, ranged in faults.requests if path == SHARD]


def test_a_connection_dropped_mid_shard_continues_at_the_byte_read(stdlib_shards: Path, serve) -> None:
    faults = Faults(drop_at={SHARD: 123_457})
    base = serve(stdlib_shards, faults)
    over_http, from_disk = stream([base + SHARD]), stream([str(stdlib_shards) + SHARD])
    for _ in range(batches_until_end_of_shard(stdlib_shards)):
        assert torch.equal(over_http.next_batch(), from_disk.next_batch())
    assert shard_requests(faults)[:2] == [None, "bytes=123457-"]
    assert over_http.skipped == 0


def test_a_stalled_connection_times_out_between_chunks_and_continues(stdlib_shards: Path, serve) -> None:
    faults = Faults(stall_at={SHARD: 200_000})
    base = serve(stdlib_shards, faults)
    opener = partial(open_url, retry=RetryPolicy(tries=3, backoff_s=0.01, read_timeout_s=0.5))
    over_http = ShardStream([base + SHARD], rank=0, world_size=1, opener=opener, **ONE_SLOT)
    from_disk = stream([str(stdlib_shards) + SHARD])
    for _ in range(batches_until_end_of_shard(stdlib_shards)):
        assert torch.equal(over_http.next_batch(), from_disk.next_batch())
    first, retry = shard_requests(faults)[:2]
    # It continues at the last byte it handed on: the stalled read may have taken part of the bytes before 200000.
    assert first is None
    assert 0 < int(retry.removeprefix("bytes=").rstrip("-")) <= 200_000


def test_a_server_answering_503_a_few_times_is_retried(stdlib_shards: Path, serve) -> None:
    faults = Faults(unavailable={SHARD: 2})
    base = serve(stdlib_shards, faults)
    over_http, from_disk = stream([base + SHARD]), stream([str(stdlib_shards) + SHARD])
    for _ in range(20):
        assert torch.equal(over_http.next_batch(), from_disk.next_batch())
    assert shard_requests(faults)[:3] == [None, None, None]


def test_after_the_last_retry_the_error_names_the_shard_and_the_tries(stdlib_shards: Path, serve) -> None:
    base = serve(stdlib_shards, Faults(unavailable={SHARD: 100}))
    with pytest.raises(UserError, match=rf"{base}{SHARD}: cannot open the shard .*gave up after 3 tries.*503"):
        stream([base + SHARD]).next_batch()


def test_skipped_shards_are_counted_in_the_cursor_and_restored(stdlib_shards: Path, serve) -> None:
    faults = Faults(unavailable={SHARD: 100})
    base = serve(stdlib_shards, faults)
    urls = [f"{base}/train-{i:06d}.tar" for i in range(2)]
    skipping = stream(urls, on_error="skip")
    while skipping.skipped == 0:  # bounded: the slot reaches the failing shard within an epoch of 2 shards
        skipping.next_batch()
    state = json.loads(json.dumps(skipping.state()))
    assert state["slots"]["0"]["skipped"] == skipping.skipped >= 1
    resumed = stream(urls, on_error="skip")
    resumed.load_state(state)
    assert resumed.skipped == skipping.skipped
    assert torch.equal(resumed.next_batch(), skipping.next_batch())


def test_object_store_shards_read_alike_and_pin_what_the_store_reports(stdlib_shards: Path) -> None:
    """fsspec's in-memory filesystem stands in for an object store (s3fs and gcsfs answer `info` alike)."""
    store = fsspec.filesystem("memory")
    names = [f"train-{i:06d}.tar" for i in range(2)]
    for name in names:  # no shards.json: pinned by size and the store's own change marker
        store.pipe(f"/ember-remote-test/{name}", (stdlib_shards / name).read_bytes())
    urls = [f"memory://ember-remote-test/{name}" for name in names]
    options = {**ONE_SLOT, "num_slots": 2}
    in_store, on_disk = stream(urls, **options), stream([str(stdlib_shards / name) for name in names], **options)
    for _ in range(20):
        assert torch.equal(in_store.next_batch(), on_disk.next_batch())
    state = json.loads(json.dumps(in_store.state()))
    assert {"size", "created"} <= set(state["shards"][0][1])
    store.pipe(f"/ember-remote-test/{names[1]}", (stdlib_shards / names[1]).read_bytes())  # written again
    with pytest.raises(UserError, match=r"train-000001\.tar \(shard 1 of data\.train\.urls\).*created"):
        stream(urls, **options).load_state(state)
    store.rm("/ember-remote-test", recursive=True)
