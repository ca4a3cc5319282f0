"""Epochs over unequal slots (15 digit shards over 4 slots: 4, 4, 4 and 3 shards): every key once per slot
epoch, the exact number of rows that takes, and a warning that the slots' epochs drift apart."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from ember.data.cursor import slot_shards
from ember.data.formats import ImageRows
from ember.data.stream import ShardStream

SHARDS, SLOTS, PER_SHARD = 15, 4, 100  # the digit_shards fixture: 15 train shards of 100


def digits(folder: Path) -> str:
    return f"{folder}/train-{{000000..{SHARDS - 1:06d}}}.tar"


def test_every_key_is_read_once_per_slot_epoch_over_unequal_slots(digit_shards: Path) -> None:
    stream = ShardStream(digits(digit_shards), micro_batch=SLOTS, rank=0, world_size=1, num_slots=SLOTS,
                         seed=5, rows=ImageRows())
    fullest = max(len(slot_shards(SHARDS, SLOTS, 5, 0, slot)) for slot in range(SLOTS)) * PER_SHARD
    ids = [sample_id for _ in range(fullest) for sample_id in stream.next_batch().ids]  # fullest rows per slot
    first_epoch = Counter(sample_id.key for sample_id in ids if sample_id.epoch == 0)
    assert len(first_epoch) == SHARDS * PER_SHARD
    assert set(first_epoch.values()) == {1}
    # The smaller slot went on into its next epoch meanwhile: exactly its shortfall of rows.
    assert sum(sample_id.epoch == 1 for sample_id in ids) == SLOTS * fullest - SHARDS * PER_SHARD
    assert not any(sample_id.epoch == 0 for sample_id in stream.next_batch().ids)


def test_unequal_slots_are_warned_about_once_per_job(digit_shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ember.data.stream"):
        for rank in range(2):
            ShardStream(digits(digit_shards), micro_batch=2, rank=rank, world_size=2, num_slots=SLOTS, rows=ImageRows())
        ShardStream(digits(digit_shards), micro_batch=2, rank=0, world_size=1, num_slots=5, rows=ImageRows())
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        "data.train.urls has 15 shards for data.num_slots=4: slots read 3 or 4 shards per epoch at the same row "
        "rate, so smaller slots start their next epoch while others finish (every sample is still read once per "
        "slot epoch). Use a multiple of 4 shards for even epochs."
    ]
