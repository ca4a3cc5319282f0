"""The serving ranks' control channel (serve/expert_actor.py Channel) on 3 real gloo ranks: rank 0's plans
reach every rank and every rank's picks reach rank 0, in one fixed-size collective each way, including
messages longer than a block (their rest goes point-to-point) and messages of several sizes in turn."""

from __future__ import annotations

import pytest

from tests.helpers.distributed import run_on_ranks

pytestmark = pytest.mark.distributed


def _exchange(rank: int, world_size: int) -> list:
    import torch.distributed as dist

    from ember.serve.expert_actor import Channel

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    channel = Channel(rank, world_size, dist.new_group(backend="gloo"))
    long = "x" * (3 * Channel.BLOCK)  # three blocks' worth: the rest travels after the block
    seen = []
    for message in ({"step": 1}, long, None, [long, 7]):
        received = channel.broadcast(message if rank == 0 else "ignored")
        mine = {"rank": rank, "text": long if rank == 2 else "short", "echo": received}
        seen.append((received, channel.gather(mine)))
    return seen


def test_broadcast_and_gather_carry_short_and_long_messages_to_every_rank() -> None:
    long = "x" * (3 * 16384)
    messages = [{"step": 1}, long, None, [long, 7]]
    results = run_on_ranks(_exchange, 3)
    for rank, seen in enumerate(results):
        assert [received for received, _ in seen] == messages
        for message, (_, gathered) in zip(messages, seen, strict=True):
            if rank == 0:
                expected = [{"rank": r, "text": long if r == 2 else "short", "echo": message} for r in range(3)]
                assert gathered == expected
            else:
                assert gathered is None
