"""The data cursor pins its shards: a resume on swapped, rebuilt or edited shards is refused naming the shard,
a moved shard set resumes, an old cursor without identities still loads, and a sample shorter than the saved
offset is an error instead of an endless loop."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tarfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from webdataset import TarWriter

from ember.data.loader import WorkerLoader
from ember.data.stream import ShardStream
from ember.errors import UserError

SMALL = {"seq_len": 64, "micro_batch": 8, "num_slots": 4, "seed": 3}


def urls(folder: Path) -> list[str]:
    return [str(folder / f"train-{i:06d}.tar") for i in range(4)]


def saved(state: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(state))


@pytest.fixture
def shards(tiny_stdlib_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny shard set (with its shards.json), free to be damaged."""
    return Path(shutil.copytree(tiny_stdlib_shards, tmp_path / "shards"))


def stream_state_after(folder: Path, batches: int, **options: Any) -> dict[str, Any]:
    stream = ShardStream(urls(folder), rank=0, world_size=1, **{**SMALL, **options})
    for _ in range(batches):
        stream.next_batch()
    return saved(stream.state())


def rewrite_shard(path: Path, change: Callable[[int, bytes], bytes]) -> None:
    """Write the shard again with each sample's text passed through change(index, text)."""
    with tarfile.open(path) as tar:
        samples = [(member.name[: -len(".txt")], tar.extractfile(member).read()) for member in tar if member.isreg()]
    with open(path, "wb") as stream, TarWriter(stream, user="ember", group="ember", mtime=0, encoder=False) as tar:
        for index, (key, text) in enumerate(samples):
            tar.write({"__key__": key, "txt": change(index, text)})


def test_the_cursor_pins_each_shard_by_the_sha256_of_its_manifest(shards: Path) -> None:
    manifest = {entry["name"]: entry for entry in json.loads((shards / "shards.json").read_text())["shards"]}
    state = stream_state_after(shards, 3)
    pinned = state["shards"][0]
    assert [entry["url"] for entry in pinned] == urls(shards)
    for entry in pinned:
        name = Path(entry["url"]).name
        assert (entry["size"], entry["sha256"]) == (manifest[name]["bytes"], manifest[name]["sha256"])


def test_a_rebuilt_set_with_the_same_count_but_swapped_shards_is_refused_naming_the_shard(shards: Path) -> None:
    state = stream_state_after(shards, 5)
    # As a rebuild that dealt the files differently would leave it: same names and count, other contents.
    first, second = shards / "train-000000.tar", shards / "train-000001.tar"
    first.rename(shards / "swap.tar")
    second.rename(first)
    (shards / "swap.tar").rename(second)
    manifest = json.loads((shards / "shards.json").read_text())
    entries = manifest["shards"]
    entries[0], entries[1] = {**entries[1], "name": entries[0]["name"]}, {**entries[0], "name": entries[1]["name"]}
    (shards / "shards.json").write_text(json.dumps(manifest))
    resumed = ShardStream(urls(shards), rank=0, world_size=1, **SMALL)
    with pytest.raises(UserError, match=r"train-000000\.tar \(shard 0 of data\.train\.urls\).*sha256"):
        resumed.load_state(state)


def test_a_shard_edited_in_place_without_a_manifest_is_refused_by_its_mtime(shards: Path) -> None:
    (shards / "shards.json").unlink()
    state = stream_state_after(shards, 5)
    assert "mtime_ns" in state["shards"][0][2]
    assert "sha256" not in state["shards"][0][2]
    edited = shards / "train-000002.tar"
    before = edited.stat().st_mtime_ns
    rewrite_shard(edited, lambda index, text: text.upper() if index == 0 else text)  # same size, other bytes
    os.utime(edited, ns=(before + 10**9, before + 10**9))  # what any write does; explicit, not left to the clock
    resumed = ShardStream(urls(shards), rank=0, world_size=1, **SMALL)
    with pytest.raises(UserError, match=r"train-000002\.tar \(shard 2 of data\.train\.urls\).*mtime_ns"):
        resumed.load_state(state)


def test_a_shard_set_moved_with_its_manifest_resumes_exactly(shards: Path, tmp_path: Path) -> None:
    reference = ShardStream(urls(shards), rank=0, world_size=1, **SMALL)
    for _ in range(7):
        reference.next_batch()
    state = saved(reference.state())
    moved = Path(shutil.copytree(shards, tmp_path / "elsewhere"))
    resumed = ShardStream(urls(moved), rank=0, world_size=1, **SMALL)
    resumed.load_state(state)
    for _ in range(5):
        assert torch.equal(resumed.next_batch(), reference.next_batch())


def test_an_old_cursor_without_shard_identities_loads_with_a_warning(
    shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference = ShardStream(urls(shards), rank=0, world_size=1, **SMALL)
    for _ in range(4):
        reference.next_batch()
    state = saved(reference.state())
    state.pop("shards", None)
    resumed = ShardStream(urls(shards), rank=0, world_size=1, **SMALL)
    with caplog.at_level(logging.WARNING, logger="ember.data.identity"):
        resumed.load_state(state)
    assert "does not pin its shards" in caplog.text
    assert torch.equal(resumed.next_batch(), reference.next_batch())


@pytest.fixture
def no_endless_loop() -> Iterator[None]:
    """Fail the test after 20 s instead of looping until the memory runs out (what the bug did)."""

    def give_up(_signum: int, _frame: object) -> None:
        raise TimeoutError("take() is still looping after 20 s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_sample_shorter_than_the_saved_offset_is_an_error_not_a_loop(shards: Path, no_endless_loop: None) -> None:
    options = {**SMALL, "num_slots": 1, "micro_batch": 1}
    stream = ShardStream(urls(shards)[:1], rank=0, world_size=1, **options)
    while stream.state()["slots"]["0"]["byte_offset"] < 200:
        stream.next_batch()
    state = saved(stream.state())
    cursor = state["slots"]["0"]
    state.pop("shards", None)  # an old cursor: nothing to tell that the shard changed before reading it
    shorten = cursor["sample_index"]
    rewrite_shard(shards / "train-000000.tar", lambda index, text: text[:10] if index == shorten else text)
    resumed = ShardStream(urls(shards)[:1], rank=0, world_size=1, **options)
    resumed.load_state(state)
    with pytest.raises(UserError, match=rf"train-000000\.tar: the data cursor points at token {cursor['byte_offset']} "
                                        r".*has only 11 tokens"):
        resumed.next_batch()


def test_a_rank_with_dataloader_workers_pins_and_checks_its_shards_too(shards: Path) -> None:
    make = partial(ShardStream, urls(shards), rank=0, world_size=1, **SMALL)
    state = saved(WorkerLoader(partial(make, num_workers=2), 2, rank=0, world_size=1).state())
    assert [entry["url"] for entry in state["shards"][0]] == urls(shards)
    rewrite_shard(shards / "train-000003.tar", lambda index, text: text + b"#")
    resumed = WorkerLoader(partial(make, num_workers=2), 2, rank=0, world_size=1)
    with pytest.raises(UserError, match=r"train-000003\.tar \(shard 3 of data\.train\.urls\)"):
        resumed.load_state(state)
