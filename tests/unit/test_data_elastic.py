"""Elastic resume: ranks stopped mid-epoch and resumed on another world size (ranks simulated in one process
with the stream API) see every sample key exactly once over the epoch."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from braceexpand import braceexpand

from ember.data.cursor import merge_states
from ember.data.loader import build_stream
from ember.spec.data import DataSpec

TRAIN_URLS = "train-{000000..000014}.tar"


def image_streams(folder: Path, world_size: int, num_workers: int = 0) -> list[Any]:
    data = DataSpec(train={"urls": f"{folder}/{TRAIN_URLS}"}, decode="image", num_workers=num_workers)
    return [build_stream(data, None, micro_batch=8, rank=rank, world_size=world_size) for rank in range(world_size)]


def train_keys(folder: Path) -> list[str]:
    """Every training key, read from the tars themselves."""
    keys = []
    for name in braceexpand(TRAIN_URLS):
        with tarfile.open(folder / name) as tar:
            keys += [member.name.split(".")[0] for member in tar.getmembers() if member.name.endswith(".png")]
    assert len(keys) == 1500
    return keys


def epoch_over(stream: Any, epoch: int) -> bool:
    return all(cursor["epoch"] > epoch for cursor in stream.state()["slots"].values())


def read_until_epoch_ends(stream: Any, seen: Counter) -> None:
    """Take batches until every slot of this rank has finished epoch 0; count the epoch-0 keys."""
    while not epoch_over(stream, 0):
        seen.update(sample_id.key for sample_id in next(stream).ids if sample_id.epoch == 0)


@pytest.mark.parametrize(
    ("before", "after", "workers_after"),
    [(4, 2, 0), (2, 3, 0), (4, 2, 2)],
    ids=["4-to-2-ranks", "2-to-3-ranks", "4-ranks-to-2-ranks-of-2-workers"],
)
def test_resume_on_another_world_size_sees_every_key_once_per_epoch(
    digit_shards: Path, before: int, after: int, workers_after: int
) -> None:
    seen: Counter = Counter()
    first = image_streams(digit_shards, before)
    for stream in first:
        for _ in range(6):  # mid-epoch: 48 of each rank's ~1500 / before rows
            seen.update(sample_id.key for sample_id in next(stream).ids)
    state = json.loads(json.dumps(merge_states([stream.state() for stream in first])))
    assert all(cursor["epoch"] == 0 and cursor["sample_index"] > 0 for cursor in state["slots"].values())
    resumed = image_streams(digit_shards, after, workers_after)
    for stream in resumed:
        stream.load_state(state)
        read_until_epoch_ends(stream, seen)
        stream.close()
    expected = train_keys(digit_shards)
    assert sorted(seen) == sorted(expected)
    assert set(seen.values()) == {1}
