"""What serving ranks exchange, on real gloo ranks.

- The control channel (serve/expert_actor.py Channel), 3 ranks: rank 0's plans reach every rank and every
  rank's picks reach rank 0, in one fixed-size collective each way, including messages longer than a block
  (their rest goes point-to-point) and messages of several sizes in turn.
- The MoE layer's bounded exchange (models/layers/moe/dispatch.py), 2 ranks: with the step's token bound
  set, counts and rows travel in one padded all-to-all, and the layer's output is bitwise the output of the
  exact two-exchange path, for uneven token counts, a rank with none, top-1 and top-2.
"""

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


def _bounded_equals_exact(rank: int, world_size: int) -> list[tuple[int, bool]]:
    import torch
    import torch.distributed as dist

    from ember.engines.expert_groups import attach_expert_groups
    from ember.models.layers.moe import EmberMoE
    from ember.models.layers.moe.dispatch import set_max_tokens
    from ember.spec.model import MoESpec
    from ember.world import ExpertPlacement, world_from_env

    world = world_from_env("cpu", ep_size=2)
    outcomes = []
    for top_k in (1, 2):
        spec = MoESpec(num_experts=4, top_k=top_k, drop_tokens=False, ep_size=2, impl="ember")
        torch.manual_seed(3)  # the same router on both ranks; each rank builds its own two experts
        layer = EmberMoE(16, 32, spec, ExpertPlacement(4, 2, world.ep_rank)).eval()
        attach_expert_groups(layer, world)
        for tokens in ((5, 1), (3, 0), (0, 4), (7, 7)):
            torch.manual_seed(100 + rank)
            x = torch.randn(tokens[rank], 16)
            with torch.no_grad():
                set_max_tokens(layer, None)
                exact, _ = layer(x)
                set_max_tokens(layer, max(tokens))
                bounded, _ = layer(x)
            outcomes.append((top_k, torch.equal(exact, bounded) and exact.shape == (tokens[rank], 16)))
    dist.barrier()
    return outcomes


def test_the_bounded_exchange_gives_bitwise_the_exact_exchanges_output() -> None:
    for outcomes in run_on_ranks(_bounded_equals_exact, 2):
        assert outcomes and all(equal for _, equal in outcomes), outcomes
