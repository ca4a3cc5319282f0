"""Shards served over HTTP by a real `http.server` on 127.0.0.1 stream exactly what they stream from disk."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ember.data.formats import ImageRows
from ember.data.stream import ShardStream
from ember.errors import UserError

TEXT = {"seq_len": 64, "micro_batch": 8, "num_slots": 4, "seed": 3}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass  # one line per request would flood the test output


@pytest.fixture(scope="module")
def serve() -> Iterator[Callable[[Path], str]]:
    """serve(folder) -> base URL of a real HTTP server on 127.0.0.1 (a thread) serving that folder."""
    servers = []

    def start(folder: Path) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_text_over_http_equals_text_from_disk_and_resumes_there(stdlib_shards: Path, serve) -> None:
    base = serve(stdlib_shards)
    disk = ShardStream(f"{stdlib_shards}/train-{{000000..000003}}.tar", rank=0, world_size=1, **TEXT)
    http = ShardStream(f"{base}/train-{{000000..000003}}.tar", rank=0, world_size=1, **TEXT)
    for _ in range(30):
        assert torch.equal(http.next_batch(), disk.next_batch())
    state = json.loads(json.dumps(http.state()))
    resumed = ShardStream(f"{base}/train-{{000000..000003}}.tar", rank=0, world_size=1, **TEXT)
    resumed.load_state(state)
    for _ in range(5):
        assert torch.equal(resumed.next_batch(), disk.next_batch())


def test_images_over_http_equal_images_from_disk(digit_shards: Path, serve) -> None:
    base = serve(digit_shards)
    options = {"micro_batch": 50, "rank": 1, "world_size": 2, "rows": ImageRows()}
    disk = ShardStream(f"{digit_shards}/train-{{000000..000014}}.tar", **options)
    http = ShardStream(f"{base}/train-{{000000..000014}}.tar", **options)
    for _ in range(8):
        from_disk, over_http = disk.next_batch(), http.next_batch()
        assert over_http.ids == from_disk.ids
        assert torch.equal(over_http.images, from_disk.images)
        assert torch.equal(over_http.labels, from_disk.labels)


def test_a_missing_http_shard_is_a_user_error_naming_its_url(stdlib_shards: Path, serve) -> None:
    base = serve(stdlib_shards)
    stream = ShardStream([f"{base}/no-such-shard.tar"], rank=0, world_size=1, **{**TEXT, "num_slots": 1})
    with pytest.raises(UserError, match=f"{base}/no-such-shard.tar"):
        stream.next_batch()
