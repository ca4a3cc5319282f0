"""Where each slot of a shard stream is, and the pure arithmetic that decides which shards a slot reads.

A stream has `num_slots` canonical slots, whatever the world size. In epoch e, slot s reads the shards
`order[s::num_slots]` of a seeded permutation `order`; a rank reads the slots `s % world_size == rank`, and
its DataLoader worker w of W the rank's slots `[w::W]`. Because the sample order within a slot depends only
on (shards, seed, num_slots), a cursor survives a new world size or worker count. When several sources are
mixed, row n of slot s comes from the source `mix_choice(seed, s, n, weights)` picks.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from typing import Any

from ember.errors import InternalError, UserError


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch's shard order; sha256 because Python's hash() is salted per process."""
    digest = hashlib.sha256(f"ember-shard-order:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The permutation of shard indices used in one epoch."""
    order = list(range(num_shards))
    random.Random(epoch_seed(seed, epoch)).shuffle(order)
    return order


def slot_shards(num_shards: int, num_slots: int, seed: int, epoch: int, slot: int) -> list[int]:
    """Shard indices that `slot` reads in `epoch`, in reading order."""
    return epoch_shard_order(num_shards, seed, epoch)[slot::num_slots]


def slot_is_empty(num_shards: int, num_slots: int, slot: int) -> bool:
    """Whether a slot gets no shard; the same in every epoch, as each epoch deals the same count."""
    return slot >= num_shards


def rank_slots(num_shards: int, num_slots: int, rank: int, world_size: int) -> list[int]:
    """The non-empty slots a rank reads, in the order it takes rows from them."""
    if not 0 <= rank < world_size:
        raise InternalError(f"rank {rank} is outside world size {world_size}")
    if num_shards < 1:
        raise UserError("the shard list is empty; check data.train.urls")
    owned = [s for s in range(rank, num_slots, world_size) if not slot_is_empty(num_shards, num_slots, s)]
    if not owned:
        filled = min(num_shards, num_slots)
        raise UserError(
            f"rank {rank} of {world_size} would get no data: only {filled} of data.num_slots={num_slots} "
            f"slots have shards ({num_shards} shard(s)). Use at most {filled} workers, or provide more "
            f"shards and set data.num_slots to at least {world_size}."
        )
    return owned


def pointer_key(rank: int, world_size: int, worker: int = 0, num_workers: int = 0) -> str:
    """Key of a round-robin pointer over slots (a rank's, or one of its workers'); it names the world size
    and worker count because it is only valid there."""
    base = f"{world_size}:{rank}"
    return base if num_workers == 0 else f"{base}:{worker}/{num_workers}"


def next_worker_key(rank: int, world_size: int, num_workers: int) -> str:
    """Key of the rank's pointer to the DataLoader worker whose batch comes next."""
    return f"{world_size}:{rank}:next/{num_workers}"


def worker_slots(slots: list[int], worker: int, num_workers: int) -> list[int]:
    """The part of a rank's slots that one of its DataLoader workers reads."""
    if num_workers < 1:
        return slots
    if len(slots) < num_workers:
        raise UserError(
            f"data.num_workers={num_workers} but this rank has only {len(slots)} slot(s) with data; use at most "
            f"{len(slots)} workers, or raise data.num_slots (with enough shards) to num_workers x world size"
        )
    return slots[worker::num_workers]


def mix_choice(seed: int, slot: int, row: int, weights: tuple[float, ...]) -> int:
    """Which source row `row` of `slot` comes from: a weighted pick seeded by (seed, slot, row) alone, so it
    is the same on any world size and after any resume. Zero weights are never picked."""
    digest = hashlib.sha256(f"ember-mix:{seed}:{slot}:{row}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * sum(weights)
    for index, weight in enumerate(weights):
        if point < weight:
            return index
        point -= weight
    return max(i for i, weight in enumerate(weights) if weight > 0)  # float round-off at the top end


@dataclass
class SlotCursor:
    """Position of the next row of one slot: the epoch, the shard within the slot's list, the sample
    within that shard, the token offset within that sample (its separator counts), and where that sample
    starts in the tar (0 when unknown), so a resume can seek there instead of reading up to it. `skipped`
    counts what the slot passed over under on_error=skip since the run began."""

    epoch: int = 0
    shard_pos: int = 0
    sample_index: int = 0
    byte_offset: int = 0
    tar_offset: int = 0
    skipped: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SlotCursor:
        fields = {name: int(raw[name]) for name in ("epoch", "shard_pos", "sample_index", "byte_offset")}
        # cursors saved before offsets or skip counts: 0
        return cls(**fields, tar_offset=int(raw.get("tar_offset", 0)), skipped=int(raw.get("skipped", 0)))

    def next_sample(self, index: int, tar_offset: int = 0) -> None:
        """Move to sample `index` of the current shard (later ones may have been skipped)."""
        if index != self.sample_index:
            self.sample_index, self.byte_offset = index, 0
        self.tar_offset = tar_offset

    def next_shard(self, shards_per_slot: int) -> None:
        """Move to the start of the slot's next shard, wrapping into the next epoch."""
        self.shard_pos, self.sample_index, self.byte_offset, self.tar_offset = self.shard_pos + 1, 0, 0, 0
        if self.shard_pos >= shards_per_slot:
            self.epoch, self.shard_pos = self.epoch + 1, 0


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the `state()` of every rank into one cursor (what the trainer saves after all_gather)."""
    if not states:
        raise InternalError("merge_states needs at least one state")
    # The shards' identity is the first rank's: hosts may hold copies with their own mtimes, and every rank
    # checks its own view on resume.
    identity = {key: value for key, value in states[0].items() if key not in ("slots", "next_slot", "shards")}
    merged: dict[str, Any] = {**identity, "slots": {}, "next_slot": {}}
    if "shards" in states[0]:
        merged["shards"] = states[0]["shards"]
    for state in states:
        if any(state.get(key) != value for key, value in identity.items()):
            raise InternalError(f"ranks disagree on the stream identity: {identity} vs {state}")
        for slot, cursor in state["slots"].items():
            if merged["slots"].setdefault(slot, cursor) != cursor:
                raise InternalError(f"two ranks report different positions for slot {slot}")
        merged["next_slot"].update(state["next_slot"])
    return merged
