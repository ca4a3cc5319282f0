"""Weighted mixing of sources (`data.sources`): digits and photo patches as image tokens, where a row's
first token says which source it came from (a class for digits, 'no class' for photos)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ember.data.cursor import merge_states
from ember.data.formats import ImageTokenRows
from ember.data.loader import build_stream
from ember.data.stream import ShardStream, WeightedUrls
from ember.errors import UserError
from ember.spec import JobSpec
from ember.spec.data import DataSpec
from ember.spec.model import GPTSpec

REPO = Path(__file__).resolve().parents[2]
NO_CLASS = 17 + 10


def sources(digits: Path, photos: Path, weights: tuple[float, float] = (3, 1)) -> list[WeightedUrls]:
    return [
        WeightedUrls(f"{digits}/train-{{000000..000014}}.tar", weights[0]),
        WeightedUrls(f"{photos}/train-{{000000..000005}}.tar", weights[1]),
    ]


def mixed(digits: Path, photos: Path, rank: int = 0, world_size: int = 1, **changes: Any) -> ShardStream:
    options = {"micro_batch": 20, "rows": ImageTokenRows(64), "num_slots": 4, "seed": 1, **changes}
    return ShardStream(sources(digits, photos), rank=rank, world_size=world_size, **options)


def test_rows_follow_the_weights_and_the_same_seed_gives_the_same_rows(digit_shards: Path, photo_shards: Path) -> None:
    first, again = mixed(digit_shards, photo_shards), mixed(digit_shards, photo_shards)
    batches = [first.next_batch() for _ in range(30)]
    assert all(torch.equal(batch, again.next_batch()) for batch in batches)
    starts = torch.cat([batch[:, 0] for batch in batches])
    photo_share = (starts == NO_CLASS).float().mean().item()
    assert 0.2 <= photo_share <= 0.3  # weight 1 of 4, over 600 rows
    assert set(starts[starts != NO_CLASS].tolist()) == set(range(17, 27))


def test_a_mixture_resumes_exactly_and_slots_ignore_the_world_size(digit_shards: Path, photo_shards: Path) -> None:
    pair = [mixed(digit_shards, photo_shards, rank, 2, micro_batch=3) for rank in range(2)]
    for stream in pair:
        [stream.next_batch() for _ in range(7)]
    state = json.loads(json.dumps(merge_states([stream.state() for stream in pair])))
    assert state["weights"] == [3.0, 1.0]
    assert all("row" in cursor for cursor in state["slots"].values())
    resumed = [mixed(digit_shards, photo_shards, rank, 2, micro_batch=3) for rank in range(2)]
    for before, after in zip(pair, resumed, strict=True):
        after.load_state(state)
        assert all(torch.equal(after.next_batch(), before.next_batch()) for _ in range(4))
    # One rank reads slots 0,1,2,3 in turn; of two ranks, rank 0 has 0,2 and rank 1 has 1,3 (as for one source).
    alone = mixed(digit_shards, photo_shards, micro_batch=4)
    ranks = [mixed(digit_shards, photo_shards, rank, 2, micro_batch=2) for rank in range(2)]
    for _ in range(5):
        a, b = ranks[0].next_batch(), ranks[1].next_batch()
        assert torch.equal(alone.next_batch(), torch.stack([a[0], b[0], a[1], b[1]]))


def test_resuming_with_other_weights_is_refused(digit_shards: Path, photo_shards: Path) -> None:
    state = mixed(digit_shards, photo_shards).state()
    other = ShardStream(
        sources(digit_shards, photo_shards, (1, 1)),
        micro_batch=20,
        rank=0,
        world_size=1,
        rows=ImageTokenRows(64),
        num_slots=4,
        seed=1,
    )
    with pytest.raises(UserError, match="weights"):
        other.load_state(state)


def test_spec_sources_build_a_mixed_stream(digit_shards: Path, photo_shards: Path) -> None:
    data = DataSpec(
        sources=[{"urls": s.urls, "weight": s.weight} for s in sources(digit_shards, photo_shards)],
        decode="image_tokens",
        num_slots=4,
        seed=1,
    )
    stream = build_stream(data, GPTSpec(seq_len=64, vocab_size=28), micro_batch=20, rank=0, world_size=1)
    assert torch.equal(next(stream), mixed(digit_shards, photo_shards).next_batch())


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.sources=[{urls: a.tar, weight: 2}]"], "exactly one of data.train"),  # and train from the file
        (["data.train=null"], "exactly one of data.train"),
        (["data.train=null", "data.sources=[{urls: a.tar, weight: 0}]"], "data.sources.0.weight"),
    ],
)
def test_the_spec_wants_exactly_one_of_train_and_positive_sources(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        JobSpec.load(REPO / "jobs" / "quickstart.yaml", overrides)
