"""The crash-point matrix: 2 gloo ranks save checkpoints through CheckpointManager; EMBER_FAULT kills one
rank (SIGKILL) at each point of the save protocol, for sync and async saves (async: in the background
thread); the whole group is then restarted, as Ray restarts it. At every point: no committed checkpoint is
lost, every one left verifies, the newest committed one is the one resumed from, and the resumed run ends
bitwise equal to an uninterrupted one (CPU, fp32).

Ranks are forked from a forkserver that imported torch once, so the 20 cases take seconds each, not the
interpreter start-ups of Ray or torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ember.checkpoint import fault
from ember.checkpoint.fence import start_attempt
from ember.checkpoint.io import load_file, save_file
from ember.checkpoint.manager import CheckpointManager, Retention, lineage_of, read_state, step_of
from ember.checkpoint.manifest import verify_manifest
from ember.world import World
from tests.helpers.distributed import FORKSERVER, free_port, preload_in_forkserver

pytestmark = pytest.mark.distributed
WORLD_SIZE, EVERY, TOTAL, CRASH_STEP, KEEP_LAST = 2, 2, 8, 6, 2
RANK_POINTS = ("before_rank_files", "after_rank_files", "after_report")  # every rank passes these
COMMIT_POINTS = ("after_manifest", "after_rename", "mid_retention")  # rank 0 only
CASES = [(point, rank) for point in RANK_POINTS for rank in range(WORLD_SIZE)]
CASES += [(point, 0) for point in (*COMMIT_POINTS, "mid_replace")]
preload_in_forkserver(__name__)


class TinyEngine:
    """A linear layer with SGD momentum; rank 0 writes the model and optimizer, every rank a part of its own."""

    def __init__(self, world: World) -> None:
        torch.manual_seed(0)
        self.world = world
        self.model = torch.nn.Linear(8, 8)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(100 + world.rank)  # the per-rank RNG a resume must restore from rank_state

    def train_step(self, step: int) -> None:
        inputs = torch.randn(4, 8, generator=torch.Generator().manual_seed(step)) + 0.1 * torch.randn(4, 8)
        loss = (self.model(inputs) - inputs.flip(1)).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        for param in self.model.parameters():
            dist.all_reduce(param.grad)
            param.grad /= self.world.world_size
        self.optimizer.step()

    def save(self, folder: Path) -> None:
        if self.world.is_main:
            save_file({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, folder / "model.pt")
        save_file({"rank": self.world.rank}, folder / f"part_{self.world.rank}.pt")

    def load(self, folder: Path) -> None:
        state = load_file(folder / "model.pt")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def train_rank(rank: int, port: int, run_dir: str, async_save: bool, fault_spec: str) -> None:
    """One rank of one attempt: start or resume, train to TOTAL, checkpoint every EVERY steps."""
    os.environ[fault.ENV] = fault_spec
    fault.configured_fault.cache_clear()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    world, run_dir = World(rank, WORLD_SIZE, rank, torch.device("cpu"), "gloo"), Path(run_dir)
    attempt = [start_attempt(run_dir) if world.is_main else None]
    dist.broadcast_object_list(attempt, src=0)
    manager = CheckpointManager(run_dir / "checkpoints", world, Retention(keep_last=KEEP_LAST), attempt=attempt[0],
                                run_dir=run_dir, async_save=async_save)
    manager.clean_stale()
    world.barrier()
    engine, step = TinyEngine(world), 0
    found = manager.agreed_latest_valid()
    manager.lineage = lineage_of(found) if found else attempt[0].id
    if found is not None:
        engine.load(found / "engine")
        torch.set_rng_state(load_file(found / f"rank_{rank:05d}.pt")["rng"])
        step = read_state(found)["step"]
    if world.is_main:
        with open(run_dir / "resumes.jsonl", "a") as log:
            log.write(json.dumps({"step": step}) + "\n")
    while step < TOTAL:
        engine.train_step(step)
        step += 1
        if step % EVERY == 0:
            manager.save(step, engine, {"world_size": WORLD_SIZE}, {"rng": torch.get_rng_state()})
    manager.wait()
    if world.is_main:
        torch.save(engine.model.state_dict(), run_dir / "final.pt")
    dist.destroy_process_group()


def run_group(run_dir: Path, async_save: bool = False, fault_spec: str = "", timeout_s: float = 60) -> list[int]:
    """Start the ranks; when one dies, kill the rest (what Ray does before it restarts the group)."""
    port = free_port()
    ranks = [FORKSERVER.Process(target=train_rank, args=(rank, port, str(run_dir), async_save, fault_spec))
             for rank in range(WORLD_SIZE)]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + timeout_s
    while any(process.is_alive() for process in ranks):
        if any(process.exitcode not in (None, 0) for process in ranks):
            for process in ranks:
                process.kill()
        assert time.monotonic() < deadline, "the group hung"
        time.sleep(0.01)
    return [process.exitcode for process in ranks]


def committed_steps(run_dir: Path) -> list[int]:
    """Steps of committed checkpoints, newest commit first, each checked to verify."""
    manager = CheckpointManager(run_dir / "checkpoints", world=None)
    return [step_of(folder) for folder in manager.committed() if not verify_manifest(folder)]


def resumed_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "resumes.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("crash-reference")
    assert run_group(run_dir) == [0, 0]
    return torch.load(run_dir / "final.pt")


@pytest.fixture
def run_dir(tmp_path: Path):
    yield tmp_path / "run"
    staging = CheckpointManager(tmp_path / "run" / "checkpoints", world=None)._staging_base()
    shutil.rmtree(staging, ignore_errors=True)


def assert_bitwise_equal(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    assert all(left[name].equal(right[name]) for name in left)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("point", "rank"), CASES, ids=[f"{point}-rank{rank}" for point, rank in CASES])
def test_a_kill_at_each_save_point_loses_nothing_and_resumes_bitwise(reference, run_dir, point, rank, mode) -> None:
    async_save = mode == "async"
    if point == "mid_replace":  # a same-step replace: step 6 is corrupt, so the run resumes at 4 and saves 6 again
        assert run_group(run_dir, async_save, f"after_rename:0:{CRASH_STEP}") != [0, 0]
        model = run_dir / "checkpoints" / f"step_{CRASH_STEP:06d}" / "engine" / "model.pt"
        model.write_bytes(model.read_bytes()[:64])
    before = committed_steps(run_dir)
    exit_codes = run_group(run_dir, async_save, f"{point}:{rank}:{CRASH_STEP}")
    assert exit_codes[rank] == -9, f"the fault at {point} never fired: {exit_codes}"

    # What the restarted group finds once it has tidied the leftovers (and restored a half-replaced step).
    CheckpointManager(run_dir / "checkpoints", world=None, run_dir=run_dir).clean_stale()
    after = committed_steps(run_dir)
    crash_committed = point in ("after_rename", "mid_retention") or (async_save and point == "after_report")
    if point in ("after_rename", "mid_retention") or CRASH_STEP in after:
        assert crash_committed
        assert after[:2] == [CRASH_STEP, CRASH_STEP - EVERY]
    else:
        assert after == [CRASH_STEP - EVERY, CRASH_STEP - 2 * EVERY]  # nothing lost, nothing half-made
    assert set(before) <= set(after) | {CRASH_STEP - 2 * EVERY}  # only retention retires, and only the oldest

    assert run_group(run_dir, async_save) == [0, 0]
    assert resumed_steps(run_dir)[-1] == after[0]  # the newest committed checkpoint is the one resumed from
    assert_bitwise_equal(torch.load(run_dir / "final.pt"), reference)
    assert committed_steps(run_dir)[:KEEP_LAST] == [TOTAL, TOTAL - EVERY]


def start_rank(rank: int, port: int, run_dir: Path, async_save: bool) -> CheckpointManager:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    world = World(rank, WORLD_SIZE, rank, torch.device("cpu"), "gloo")
    return CheckpointManager(run_dir / "checkpoints", world, run_dir=run_dir, async_save=async_save)


def save_and_record(rank: int, port: int, run_dir: str, async_save: bool, private_run_dir: bool) -> None:
    """Save step 1 and record how it went on this rank; rank 1's state cannot be pickled
    in an async save, and with `private_run_dir` rank 1 sees a run folder of its own (storage not shared)."""
    run_dir = Path(run_dir)
    if private_run_dir and rank == 1:
        hide_run_dir(run_dir)
    manager = start_rank(rank, port, run_dir, async_save)
    rank_state = {"rng": torch.get_rng_state(), "hook": (lambda: 0) if async_save and rank == 1 else None}
    outcome = "committed"
    try:
        manager.save(1, TinyEngine(manager.world), {"world_size": WORLD_SIZE}, rank_state)
        manager.wait()
    except Exception as exc:  # noqa: BLE001 - the outcome is what this test records
        outcome = f"{type(exc).__name__}: {exc}"
    (run_dir.parent / f"outcome{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def hide_run_dir(run_dir: Path) -> None:
    """A mount namespace of this process only, with an empty tmpfs over the run folder: another host's disk."""
    import ctypes
    import subprocess

    if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) != 0:  # CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(run_dir)], check=True)


def outcomes(run_dir: Path, async_save: bool, private_run_dir: bool) -> list[str]:
    run_dir.mkdir(parents=True)
    port = free_port()
    ranks = [FORKSERVER.Process(target=save_and_record, args=(rank, port, str(run_dir), async_save, private_run_dir))
             for rank in range(WORLD_SIZE)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    assert [process.exitcode for process in ranks] == [0, 0]
    return [json.loads((run_dir.parent / f"outcome{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def test_a_failed_write_on_another_rank_fails_the_async_save_with_that_ranks_error(tmp_path: Path) -> None:
    rank0, rank1 = outcomes(tmp_path / "run", async_save=True, private_run_dir=False)
    assert "rank 1 on" in rank0  # rank 1's own message reached rank 0: not the group's timeout, nor a hang
    assert "could not write its checkpoint files" in rank0
    assert "pickle" in rank1.lower() or "lambda" in rank1
    assert CheckpointManager(tmp_path / "run" / "checkpoints", world=None).committed() == []


def test_a_run_dir_that_is_not_shared_fails_the_save_at_once_on_every_rank(tmp_path: Path) -> None:
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("a private mount namespace needs root")
    results = outcomes(tmp_path / "run", async_save=False, private_run_dir=True)
    for outcome in results:
        assert outcome.startswith("UserError")  # on every rank, named: not the group's timeout, nor a hang
        assert "rank 1 on" in outcome
        assert "storage every host" in outcome
