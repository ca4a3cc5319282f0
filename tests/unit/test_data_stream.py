"""ShardStream on real stdlib shards: packing, slot ownership, exact resume, error policy; cursor maths."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
import torch
from webdataset import TarWriter

from ember.data.cursor import (
    SlotCursor,
    epoch_shard_order,
    rank_slots,
    slot_shards,
)
from ember.data.stream import ShardStream, decode_text, merge_states, open_url
from ember.errors import InternalError, UserError


def train_urls(folder: Path) -> list[str]:
    return [str(folder / f"train-{i:06d}.tar") for i in range(4)]


def take(stream: ShardStream, count: int) -> list[torch.Tensor]:
    return [stream.next_batch() for _ in range(count)]


def saved(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint gives back: the state after a JSON round trip."""
    return json.loads(json.dumps(state))


def assert_same_batches(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got, want)


def rank_streams(urls: list[str], world_size: int, **options: Any) -> list[ShardStream]:
    return [ShardStream(urls, rank=rank, world_size=world_size, **options) for rank in range(world_size)]


def epochs(state: dict[str, Any]) -> list[int]:
    return [cursor["epoch"] for cursor in state["slots"].values()]


SMALL = {"seq_len": 64, "micro_batch": 8, "num_slots": 4, "seed": 3}


# Cursor arithmetic, no I/O.


def test_epoch_order_is_a_seeded_permutation_that_changes_per_epoch() -> None:
    orders = [epoch_shard_order(10, seed=0, epoch=e) for e in range(3)]
    assert all(sorted(order) == list(range(10)) for order in orders)
    assert orders[0] != orders[1] != orders[2]
    assert epoch_shard_order(10, seed=0, epoch=1) == orders[1]
    assert epoch_shard_order(10, seed=1, epoch=1) != orders[1]


def test_slots_partition_each_epochs_shards() -> None:
    for epoch in range(3):
        dealt = [slot_shards(10, 4, 0, epoch, slot) for slot in range(4)]
        assert sorted(i for shards in dealt for i in shards) == list(range(10))
        assert [len(shards) for shards in dealt] == [3, 3, 2, 2]


def test_rank_slots_skip_empty_slots_and_refuse_a_rank_without_data() -> None:
    assert rank_slots(num_shards=3, num_slots=8, rank=0, world_size=2) == [0, 2]
    assert rank_slots(num_shards=3, num_slots=8, rank=1, world_size=2) == [1]
    with pytest.raises(UserError, match="num_slots"):
        rank_slots(num_shards=3, num_slots=8, rank=3, world_size=4)


def test_cursor_moves_to_the_next_epoch_after_its_last_shard() -> None:
    cursor = SlotCursor(epoch=0, shard_pos=1, sample_index=7, byte_offset=5)
    cursor.next_shard(shards_per_slot=2)
    assert cursor == SlotCursor(epoch=1, shard_pos=0, sample_index=0, byte_offset=0)


def test_merge_states_joins_ranks_and_rejects_disagreement() -> None:
    base = {"seed": 0, "num_slots": 4, "num_shards": 4}
    rank0 = {**base, "slots": {"0": SlotCursor().to_dict()}, "next_slot": {"2:0": 1}}
    rank1 = {**base, "slots": {"1": SlotCursor(epoch=2).to_dict()}, "next_slot": {"2:1": 0}}
    merged = merge_states([rank0, rank1])
    assert merged["slots"] == {**rank0["slots"], **rank1["slots"]}
    assert merged["next_slot"] == {"2:0": 1, "2:1": 0}
    with pytest.raises(InternalError):
        merge_states([rank0, {**rank1, "seed": 9}])


# Batches.


def test_batches_are_long_byte_tokens_of_the_requested_shape(stdlib_shards: Path) -> None:
    stream = ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, **SMALL)
    batch = next(iter(stream))
    assert batch.shape == (8, 65)
    assert batch.dtype == torch.long
    assert int(batch.min()) >= 0
    assert int(batch.max()) <= 255


def test_rows_pack_documents_back_to_back_with_a_zero_separator(stdlib_shards: Path) -> None:
    # One slot reads every shard; its first shard's documents, each ended by 0, are the start of the stream.
    stream = ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, **{**SMALL, "num_slots": 1})
    first_shard = train_urls(stdlib_shards)[epoch_shard_order(4, SMALL["seed"], 0)[0]]
    with tarfile.open(first_shard) as tar:
        expected = b"".join(tar.extractfile(member).read() + b"\0" for member in tar.getmembers())
    tokens = torch.cat(take(stream, 300)).flatten().numpy().astype(np.uint8).tobytes()
    assert len(tokens) < len(expected)
    assert tokens == expected[: len(tokens)]
    assert tokens.count(b"\0") > 2


def test_two_streams_with_the_same_arguments_give_the_same_batches(stdlib_shards: Path) -> None:
    first, second = (ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, **SMALL) for _ in range(2))
    assert_same_batches(take(first, 20), take(second, 20))
    other_seed = ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, **{**SMALL, "seed": 4})
    take(other_seed, 20)
    assert not torch.equal(other_seed.next_batch(), take(first, 1)[0])


def test_ranks_own_disjoint_slots_and_read_different_rows(stdlib_shards: Path) -> None:
    rank0, rank1 = rank_streams(train_urls(stdlib_shards), 2, **SMALL)
    assert set(rank0.slots).isdisjoint(rank1.slots)
    assert sorted(rank0.slots + rank1.slots) == [0, 1, 2, 3]
    rows0 = {tuple(row.tolist()) for batch in take(rank0, 5) for row in batch}
    rows1 = {tuple(row.tolist()) for batch in take(rank1, 5) for row in batch}
    assert rows0.isdisjoint(rows1)


def test_each_slot_reads_the_same_rows_whatever_the_world_size(stdlib_shards: Path) -> None:
    # One rank takes rows from slots 0,1,2,3 in turn; of two ranks, rank 0 has slots 0,2 and rank 1 has 1,3.
    options = {**SMALL, "micro_batch": 4}
    alone = ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, **options)
    rank0, rank1 = rank_streams(train_urls(stdlib_shards), 2, **{**options, "micro_batch": 2})
    for _ in range(10):
        a, b = rank0.next_batch(), rank1.next_batch()
        assert torch.equal(alone.next_batch(), torch.stack([a[0], b[0], a[1], b[1]]))


# Exact resume.


@pytest.mark.parametrize("taken", [0, 1, 37])
def test_resume_on_one_rank_is_bitwise_equal(stdlib_shards: Path, taken: int) -> None:
    reference = ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, **SMALL)
    take(reference, taken)
    state = saved(reference.state())
    resumed = ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, **SMALL)
    resumed.load_state(state)
    assert_same_batches(take(resumed, 5), take(reference, 5))


def test_resume_on_two_ranks_from_merged_states_is_bitwise_equal(stdlib_shards: Path) -> None:
    options = {**SMALL, "micro_batch": 3}  # odd, so each rank's turn pointer is mid-cycle when saved
    reference = rank_streams(train_urls(stdlib_shards), 2, **options)
    for stream in reference:
        take(stream, 11)
    state = saved(merge_states([stream.state() for stream in reference]))
    resumed = rank_streams(train_urls(stdlib_shards), 2, **options)
    for stream in resumed:
        stream.load_state(state)
    for before, after in zip(reference, resumed, strict=True):
        assert_same_batches(take(after, 5), take(before, 5))


def test_resume_across_an_epoch_boundary_is_bitwise_equal(tiny_stdlib_shards: Path) -> None:
    options = {**SMALL, "num_slots": 2, "seq_len": 256, "micro_batch": 4}  # two shards per slot
    reference = ShardStream(train_urls(tiny_stdlib_shards), rank=0, world_size=1, **options)
    states = [saved(reference.state())]
    batches = []
    while min(cursor["epoch"] for cursor in states[-1]["slots"].values()) < 2:
        batches.append(reference.next_batch())
        states.append(saved(reference.state()))
    crossings = [k for k in range(1, len(states)) if epochs(states[k]) != epochs(states[k - 1])]
    assert len(crossings) >= 2
    for k in crossings:
        start = k - 1  # the last batch before the crossing, so the next batches run into the new epoch
        resumed = ShardStream(train_urls(tiny_stdlib_shards), rank=0, world_size=1, **options)
        resumed.load_state(states[start])
        assert_same_batches(take(resumed, min(5, len(batches) - start)), batches[start : start + 5])


def test_load_state_from_another_world_size_keeps_every_slot_position(stdlib_shards: Path) -> None:
    pair = rank_streams(train_urls(stdlib_shards), 2, **SMALL)
    for stream in pair:
        take(stream, 7)
    state = saved(merge_states([stream.state() for stream in pair]))
    alone = ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, **SMALL)
    alone.load_state(state)
    assert alone.state()["slots"] == state["slots"]
    assert alone.next_batch().shape == (8, 65)


@pytest.mark.parametrize("change", [{"seed": 4}, {"num_slots": 2}])
def test_load_state_refuses_another_seed_or_slot_count(stdlib_shards: Path, change: dict) -> None:
    state = saved(ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, **SMALL).state())
    other = ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, **{**SMALL, **change})
    with pytest.raises(UserError, match=next(iter(change))):
        other.load_state(state)


class CountingOpener:
    """The stream's own `opener` hook, recording which shards it opens."""

    def __init__(self) -> None:
        self.opened: list[str] = []

    def __call__(self, url: str) -> BinaryIO:
        self.opened.append(url)
        return open_url(url)


class CountingDecoder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, sample: dict[str, bytes]) -> np.ndarray:
        self.calls += 1
        return decode_text(sample)


def test_resume_far_into_an_epoch_reads_only_the_current_shard_of_each_slot(stdlib_shards: Path) -> None:
    options = {**SMALL, "micro_batch": 4}  # one row per slot per batch
    reference = ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, **options)
    take(reference, 1500)
    state = saved(reference.state())
    assert all(c["sample_index"] >= 2 and c["epoch"] == 0 for c in state["slots"].values())
    opener, decoder = CountingOpener(), CountingDecoder()
    resumed = ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, opener=opener, decode=decoder, **options)
    resumed.load_state(state)
    assert torch.equal(resumed.next_batch(), reference.next_batch())
    urls = train_urls(stdlib_shards)
    current = [urls[slot_shards(4, 4, SMALL["seed"], 0, int(slot))[0]] for slot in state["slots"]]
    assert sorted(opener.opened) == sorted(current)
    assert decoder.calls <= 8  # the sample under each cursor, and at most the one after it


# Error policy.


def truncated_copy(shard: Path, folder: Path) -> Path:
    copy = folder / f"truncated-{shard.name}"
    copy.write_bytes(shard.read_bytes()[:5_100])  # not on a 512-byte block edge: inside a member
    return copy


def test_a_truncated_shard_raises_naming_the_file(stdlib_shards: Path, tmp_path: Path) -> None:
    broken = truncated_copy(stdlib_shards / "train-000000.tar", tmp_path)
    stream = ShardStream([str(broken)], rank=0, world_size=1, **{**SMALL, "num_slots": 1})
    with pytest.raises(UserError, match="truncated-train-000000.tar") as caught:
        take(stream, 200)
    assert "sample" in str(caught.value)
    assert "on_error=skip" in str(caught.value)


def test_skip_passes_a_truncated_shard_and_leaves_other_slots_alone(stdlib_shards: Path, tmp_path: Path) -> None:
    urls = train_urls(stdlib_shards)
    broken_urls = list(urls)
    broken_urls[2] = str(truncated_copy(Path(urls[2]), tmp_path))
    options = {**SMALL, "micro_batch": 4, "seq_len": 256, "on_error": "skip"}
    good = ShardStream(urls, rank=0, world_size=1, **options)
    broken = ShardStream(broken_urls, rank=0, world_size=1, **options)
    good_batches, broken_batches = take(good, 40), take(broken, 40)
    assert broken.skipped > 0
    assert good.skipped == 0
    broken_slot = next(s for s in range(4) if slot_shards(4, 4, SMALL["seed"], 0, s) == [2])
    for row in set(range(4)) - {broken_slot}:  # with micro_batch 4, row i of every batch comes from slot i
        assert all(torch.equal(g[row], b[row]) for g, b in zip(good_batches, broken_batches, strict=True))
    assert all(c["epoch"] == 0 for slot, c in good.state()["slots"].items() if int(slot) != broken_slot)


def test_an_undecodable_sample_raises_with_its_key_or_is_skipped(stdlib_shards: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.tar"
    with open(mixed, "wb") as stream, TarWriter(stream, encoder=False) as tar:
        tar.write({"__key__": "good-one", "txt": b"hello"})
        tar.write({"__key__": "no-text", "bin": b"\x01\x02"})
        tar.write({"__key__": "good-two", "txt": b"world"})
    options = {**SMALL, "num_slots": 1, "seq_len": 8, "micro_batch": 1}
    with pytest.raises(UserError, match="no-text"):
        take(ShardStream([str(mixed)], rank=0, world_size=1, **options), 1)
    skipping = ShardStream([str(mixed)], rank=0, world_size=1, **{**options, "on_error": "skip"})
    assert bytes(skipping.next_batch()[0].tolist()) == b"hello\0wor"
    assert skipping.skipped == 1


def test_a_missing_shard_is_a_user_error_naming_it(stdlib_shards: Path, tmp_path: Path) -> None:
    shutil.copy(stdlib_shards / "train-000000.tar", tmp_path / "present.tar")
    stream = ShardStream(
        [str(tmp_path / "present.tar"), str(tmp_path / "absent.tar")],
        rank=0,
        world_size=1,
        **{**SMALL, "num_slots": 2},
    )
    with pytest.raises(UserError, match="absent.tar"):
        take(stream, 1)


def test_a_shard_cut_at_a_member_boundary_is_caught_too(stdlib_shards: Path, tmp_path: Path) -> None:
    # tarfile itself reads such a cut as a normal end of archive; a complete tar ends in zero blocks.
    shard = stdlib_shards / "train-000000.tar"
    with tarfile.open(shard) as tar:
        third = tar.getmembers()[2]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: third.offset])
    options = {**SMALL, "num_slots": 1, "seq_len": 1024, "micro_batch": 1}
    with pytest.raises(UserError, match="cut.tar: corrupt or truncated shard .* end-of-archive"):
        take(ShardStream([str(cut)], rank=0, world_size=1, **options), 200)
    skipping = ShardStream([str(cut)], rank=0, world_size=1, **{**options, "on_error": "skip"})
    take(skipping, 200)
    assert skipping.skipped >= 1
    assert all(c["epoch"] >= 1 for c in skipping.state()["slots"].values())


class ByteCountingOpener:
    """The stream's `opener` hook, counting the bytes read through the files it opens."""

    def __init__(self) -> None:
        self.read = 0

    def __call__(self, url: str) -> BinaryIO:
        file, opener = open_url(url), self

        class Counted:
            def read(self, size: int = -1) -> bytes:
                data = file.read(size)
                opener.read += len(data)
                return data

            def seekable(self) -> bool:
                return file.seekable()

            def seek(self, offset: int) -> int:
                return file.seek(offset)

            def close(self) -> None:
                file.close()

        return Counted()


def test_resume_seeks_to_the_saved_sample_instead_of_reading_up_to_it(stdlib_shards: Path) -> None:
    options = {**SMALL, "num_slots": 1, "micro_batch": 4}
    reference = ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, **options)
    while reference.state()["slots"]["0"]["tar_offset"] < 300_000:
        reference.next_batch()
    state = saved(reference.state())
    assert state["slots"]["0"]["epoch"] == 0
    assert state["slots"]["0"]["shard_pos"] == 0
    opener = ByteCountingOpener()
    resumed = ShardStream(train_urls(stdlib_shards), rank=0, world_size=1, opener=opener, **options)
    resumed.load_state(state)
    assert_same_batches(take(resumed, 3), take(reference, 3))
    assert opener.read < state["slots"]["0"]["tar_offset"] / 2  # what comes after, not the 300 KB before
