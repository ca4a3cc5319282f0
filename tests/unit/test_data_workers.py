"""DataLoader workers: 2 ranks x 2 real worker processes each, stopped and resumed, give the batches of an
uninterrupted run; the saved cursor is what the trainer consumed, not what the workers prefetched; the
workers' groups of batches per transfer change neither the batches nor the cursor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ember.data.cursor import merge_states
from ember.data.formats import ImageBatch
from ember.data.loader import GROUP_BATCHES, WorkerLoader, build_stream
from ember.data.stream import ShardStream
from ember.errors import UserError
from ember.spec.data import DataSpec
from ember.spec.model import GPTSpec

TEXT_MODEL = GPTSpec(seq_len=64)


def text_data(folder: Path, **changes: Any) -> DataSpec:
    options = {"num_slots": 4, "seed": 3, "num_workers": 2, **changes}
    return DataSpec(train={"urls": f"{folder}/train-{{000000..000003}}.tar"}, **options)


def image_data(folder: Path, **changes: Any) -> DataSpec:
    return DataSpec(train={"urls": f"{folder}/train-{{000000..000014}}.tar"}, decode="image", num_workers=2, **changes)


def rank_loaders(data: DataSpec, world_size: int = 2, micro_batch: int = 3) -> list[Any]:
    model = TEXT_MODEL if data.decode == "text" else None  # images: a future diffusion or GAN model
    return [build_stream(data, model, micro_batch, rank, world_size) for rank in range(world_size)]


def take(stream: Any, count: int) -> list[Any]:
    return [next(stream) for _ in range(count)]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, ImageBatch):
        return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.ids == b.ids
    return torch.equal(a, b)


def saved_state(streams: list[Any]) -> dict[str, Any]:
    """Merge the ranks' cursors and round-trip them through JSON, as a checkpoint does."""
    return json.loads(json.dumps(merge_states([stream.state() for stream in streams])))


@pytest.mark.parametrize("kind", ["text", "images"])
def test_resume_with_two_ranks_of_two_workers_continues_the_uninterrupted_batches(
    kind: str, stdlib_shards: Path, digit_shards: Path
) -> None:
    data = text_data(stdlib_shards) if kind == "text" else image_data(digit_shards)
    stopped_at, after = 5, 4  # odd: the next batch is due from each rank's second worker
    reference = rank_loaders(data)
    expected = [take(loader, stopped_at + after) for loader in reference]
    interrupted = rank_loaders(data)
    for loader in interrupted:
        assert isinstance(loader, WorkerLoader)
        take(loader, stopped_at)
    state = saved_state(interrupted)
    for loader in interrupted + reference:
        loader.close()
    resumed = rank_loaders(data)
    for loader in resumed:
        loader.load_state(state)
    for rank, loader in enumerate(resumed):
        assert all(same(got, want) for got, want in zip(take(loader, after), expected[rank][stopped_at:], strict=True))
        loader.close()


def test_the_saved_cursor_is_what_was_consumed_not_what_was_prefetched(stdlib_shards: Path) -> None:
    data = text_data(stdlib_shards)
    loader = build_stream(data, TEXT_MODEL, 3, rank=0, world_size=1)
    take(loader, 5)  # worker 0 made batches 0, 2, 4; worker 1 batches 1, 3; both have prefetched more
    loader.close()
    # The same worker streams in this process, advanced by exactly the batches handed out.
    workers = [
        ShardStream(
            data.train.urls,
            seq_len=64,
            micro_batch=3,
            rank=0,
            world_size=1,
            num_slots=4,
            seed=3,
            worker=worker,
            num_workers=2,
        )
        for worker in range(2)
    ]
    take(workers[0], 3)
    take(workers[1], 2)
    expected = merge_states([workers[0].state(), workers[1].state()])
    state = loader.state()
    assert state["slots"] == expected["slots"]
    assert state["next_slot"]["1:0:next/2"] == 1


def test_the_batches_and_cursor_are_the_same_whatever_the_workers_group_sizes(stdlib_shards: Path) -> None:
    data = text_data(stdlib_shards)
    grouped = build_stream(data, TEXT_MODEL, 3, rank=0, world_size=1)
    one_by_one = build_stream(data, TEXT_MODEL, 3, rank=0, world_size=1)
    assert isinstance(grouped, WorkerLoader) and isinstance(one_by_one, WorkerLoader)
    assert grouped.group_batches == GROUP_BATCHES > 1
    one_by_one.group_batches = 1  # read when its DataLoader starts, at the first batch
    count = 2 * 2 * GROUP_BATCHES + 3  # past two groups of each worker, ending inside a group
    assert all(same(a, b) for a, b in zip(take(grouped, count), take(one_by_one, count), strict=True))
    assert grouped.state() == one_by_one.state()
    grouped.close()
    one_by_one.close()


def test_more_workers_than_slots_is_a_user_error(stdlib_shards: Path) -> None:
    with pytest.raises(UserError, match="data.num_workers=3"):
        rank_loaders(text_data(stdlib_shards, num_workers=3))


def truncated(shard: Path, folder: Path) -> Path:
    copy = folder / f"truncated-{shard.name}"
    copy.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2 + 100])  # mid-member, not on a block edge
    return copy


def test_a_worker_error_reaches_the_trainer_as_one_user_error_naming_the_shard(
    digit_shards: Path, tmp_path: Path
) -> None:
    broken = truncated(digit_shards / "train-000003.tar", tmp_path)
    urls = [str(digit_shards / f"train-{i:06d}.tar") for i in range(3)] + [str(broken)]
    data = DataSpec(train={"urls": urls}, decode="image", num_slots=4, num_workers=2)
    loader = build_stream(data, None, micro_batch=16, rank=0, world_size=1)
    with pytest.raises(UserError, match="truncated-train-000003.tar") as caught:
        take(loader, 20)
    assert "Traceback" not in str(caught.value)
    skipping = build_stream(data.model_copy(update={"on_error": "skip"}), None, 16, rank=0, world_size=1)
    batches = take(skipping, 20)  # 320 rows: past the broken half of the fourth shard
    assert skipping.skipped == 1
    assert all(batch.images.shape == (16, 1, 8, 8) for batch in batches)
    skipping.close()
