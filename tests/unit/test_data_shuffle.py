"""data.shuffle_buffer: each slot yields fixed windows of rows in a seeded order. The order changes, the set of
rows per epoch does not, and a resume anywhere (mid-window, at a window edge, on another world size) lands on
exactly the row an uninterrupted run would read next."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ember.data.cursor import merge_states
from ember.data.loader import build_stream
from ember.data.stream import ShardStream
from ember.errors import UserError
from ember.spec.data import DataSpec
from tests.unit.test_data_elastic import TRAIN_URLS, train_keys

WINDOW = 16
TEXT = {"seq_len": 64, "micro_batch": 8, "num_slots": 4, "seed": 3}


def text_stream(folder: Path, shuffle: int = WINDOW, **options: Any) -> ShardStream:
    urls = [str(folder / f"train-{i:06d}.tar") for i in range(4)]
    return ShardStream(urls, rank=0, world_size=1, shuffle_buffer=shuffle, **{**TEXT, **options})


def saved(state: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(state))


def rows_of(stream: ShardStream, batches: int) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for _ in range(batches) for row in stream.next_batch()]


def test_the_buffer_reorders_rows_within_windows_and_keeps_them_all(stdlib_shards: Path) -> None:
    # 4 slots, 8 rows a batch: 2 rows per slot per batch, so 8 batches drain one 16-row window of every slot.
    plain, shuffled = rows_of(text_stream(stdlib_shards, shuffle=0), 8), rows_of(text_stream(stdlib_shards), 8)
    assert shuffled != plain
    assert Counter(shuffled) == Counter(plain)
    again = rows_of(text_stream(stdlib_shards), 8)
    assert again == shuffled  # seeded: the same order every time
    other_seed = rows_of(text_stream(stdlib_shards, seed=4), 8)
    assert other_seed != shuffled


@pytest.mark.parametrize("taken", [0, 1, 5, 8, 13])  # 8: exactly at a window edge
def test_resume_anywhere_in_a_window_is_bitwise_equal(stdlib_shards: Path, taken: int) -> None:
    reference = text_stream(stdlib_shards)
    rows_of(reference, taken)
    state = saved(reference.state())
    resumed = text_stream(stdlib_shards)
    resumed.load_state(state)
    assert rows_of(resumed, 12) == rows_of(reference, 12)


def test_a_cursor_needs_the_same_buffer_size(stdlib_shards: Path) -> None:
    reference = text_stream(stdlib_shards)
    rows_of(reference, 3)
    for other in (0, WINDOW * 2):
        with pytest.raises(UserError, match="shuffle_buffer"):
            text_stream(stdlib_shards, shuffle=other).load_state(saved(reference.state()))


def window_epoch(cursor: dict[str, Any]) -> int:
    """The epoch where a slot's current window starts: once that is past epoch 0, every epoch-0 row is out."""
    return cursor["window_start"]["epoch"]


@pytest.mark.parametrize(("before", "after"), [(4, 2), (2, 3)])
def test_elastic_resume_with_a_buffer_sees_every_key_once_per_epoch(digit_shards: Path, before: int, after: int):
    data = DataSpec(train={"urls": f"{digit_shards}/{TRAIN_URLS}"}, decode="image", shuffle_buffer=32)
    streams = [build_stream(data, None, micro_batch=8, rank=rank, world_size=before) for rank in range(before)]
    seen: Counter = Counter()
    for stream in streams:
        for _ in range(5):  # mid-window for some slots: 5 x 8 rows over 2-4 slots
            seen.update(sample_id.key for sample_id in next(stream).ids)
    state = saved(merge_states([stream.state() for stream in streams]))
    assert any(cursor["taken"] > 0 for cursor in state["slots"].values())
    for rank in range(after):
        stream = build_stream(data, None, micro_batch=8, rank=rank, world_size=after)
        stream.load_state(state)
        while not all(window_epoch(cursor) > 0 for cursor in stream.state()["slots"].values()):
            seen.update(sample_id.key for sample_id in next(stream).ids if sample_id.epoch == 0)
        stream.close()
    assert sorted(seen) == sorted(train_keys(digit_shards))
    assert set(seen.values()) == {1}

