"""The commit protocol on one rank: fencing without a window, attempt-scoped leftovers, same-step replace,
and full or read-only storage as one clear UserError. Faults are injected at named points (EMBER_FAULT)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ember.checkpoint import fault
from ember.checkpoint.fence import current_attempt, start_attempt
from ember.checkpoint.manager import CheckpointManager
from ember.checkpoint.manifest import read_manifest, verify_manifest
from ember.errors import InternalError, UserError
from ember.world import local_world


class SelfWritingEngine:
    """Writes its files itself (as DeepSpeed and torch DCP do), so an async save stages them on disk."""

    def __init__(self, size: int = 25_000) -> None:
        self.weights = torch.arange(size, dtype=torch.float32)

    def save(self, folder: Path) -> None:
        torch.save(self.weights, folder / "weights.pt")


@pytest.fixture
def world():
    return local_world()


@pytest.fixture
def injected(monkeypatch, tmp_path: Path):
    """Set EMBER_FAULT for this test (the hook reads it once per process)."""

    def inject(value: str) -> Path:
        monkeypatch.setenv(fault.ENV, value)
        fault.configured_fault.cache_clear()
        return tmp_path / "fault"

    yield inject
    monkeypatch.delenv(fault.ENV, raising=False)
    fault.configured_fault.cache_clear()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator:
    """Real small (or read-only) file systems: tmpfs mounts, which need root."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            if os.environ.get("CI") == "true":
                pytest.fail(f"cannot mount a tmpfs: {result.stderr.decode()}")
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def manager(run_dir: Path, world, **kwargs) -> CheckpointManager:
    return CheckpointManager(run_dir / "checkpoints", world, run_dir=run_dir, **kwargs)


def save(m: CheckpointManager, step: int, engine=None) -> Path:
    result = m.save(step, engine or SelfWritingEngine(), {"world_size": 1}, {"rng": torch.get_rng_state()})
    m.wait()
    return result.path


def paused_save(m: CheckpointManager, step: int, marker: Path) -> None:
    """An async save whose background thread stops after its report, before rank 0's commit."""
    m.save(step, SelfWritingEngine(), {"world_size": 1}, {})
    while not Path(f"{marker}.paused").exists():
        assert m._pending.is_alive()


def release(marker: Path) -> None:
    Path(f"{marker}.go").touch()


def test_an_attempt_started_after_the_reports_fences_the_stale_commit(tmp_path, world, injected) -> None:
    marker = injected(f"after_report:0:2:pause@{tmp_path / 'fault'}")
    old = manager(tmp_path, world, attempt=start_attempt(tmp_path), async_save=True)
    paused_save(old, 2, marker)
    start_attempt(tmp_path)  # Ray restarted the group while the old one's save was in flight
    release(marker)
    with pytest.raises(InternalError, match="attempt 1 is stale"):
        old.wait()
    assert old.committed() == []


def test_a_stale_attempts_save_neither_satisfies_nor_deletes_the_new_attempts(tmp_path, world, injected) -> None:
    marker = injected(f"after_report:0:2:pause@{tmp_path / 'fault'}")
    old = manager(tmp_path, world, attempt=start_attempt(tmp_path), async_save=True)
    paused_save(old, 2, marker)
    new = manager(tmp_path, world, attempt=start_attempt(tmp_path))
    committed = save(new, 2)
    release(marker)
    with pytest.raises(InternalError, match="stale"):
        old.wait()
    assert verify_manifest(committed) == []
    assert read_manifest(committed)["attempt"]["id"] == new.attempt.id
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000002"]


def start_attempts(run_dir: Path, count: int) -> None:
    for _ in range(count):
        start_attempt(run_dir)


def test_start_attempt_is_a_locked_read_modify_write(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    starters = [context.Process(target=start_attempts, args=(tmp_path, 25)) for _ in range(4)]
    for process in starters:
        process.start()
    for process in starters:
        process.join()
    assert current_attempt(tmp_path).number == 100  # no two starters read the same previous number


def test_a_same_step_replace_keeps_the_old_folder_until_the_new_one_is_in(tmp_path, world) -> None:
    m = manager(tmp_path, world, attempt=start_attempt(tmp_path))
    first = save(m, 4)
    aside = first.with_name(f"step_000004.{m.attempt.id}.old")
    first.rename(aside)  # where a save killed between the two renames leaves it
    m = manager(tmp_path, world, attempt=start_attempt(tmp_path))
    m.clean_stale()
    assert m.latest_valid() == first
    assert not aside.exists()
    save(m, 4)  # a replace that completes leaves nothing aside
    assert sorted(p.name for p in first.parent.iterdir()) == ["step_000004"]
    assert read_manifest(first)["attempt"]["id"] == m.attempt.id


def test_leftovers_of_dead_attempts_are_cleaned_at_attempt_start(tmp_path, world) -> None:
    staging = tmp_path / "shm"
    m = manager(tmp_path, world, attempt=start_attempt(tmp_path), staging_root=staging)
    save(m, 1)
    root = tmp_path / "checkpoints"
    for name in ("step_000002.dead01.tmp", "step_000002.tmp", "step_000001.dead01.trash"):
        (root / name / "engine").mkdir(parents=True)
    dead_staging = m._staging_base() / "dead01" / "step_000002"
    dead_staging.mkdir(parents=True)
    m = manager(tmp_path, world, attempt=start_attempt(tmp_path), staging_root=staging)
    m.clean_stale()
    assert [p.name for p in root.iterdir()] == ["step_000001"]
    assert not dead_staging.parent.exists()


def test_a_full_run_dir_is_a_user_error_naming_it(tmp_path, world, small_fs) -> None:
    run_dir = small_fs("full", "size=64k")
    with pytest.raises(UserError, match=f"{run_dir}.*(device is full|No space)") as raised:
        save(manager(run_dir, world), 1)
    assert raised.value.exit_code == 2


def test_a_read_only_run_dir_is_a_user_error_naming_it(tmp_path, world, small_fs) -> None:
    run_dir = small_fs("read-only", "ro,size=1m")
    with pytest.raises(UserError, match=f"{run_dir}/checkpoints.*not writable"):
        save(manager(run_dir, world), 1)


def test_async_staging_checks_free_space_before_staging(tmp_path, world, small_fs) -> None:
    staging = small_fs("shm", "size=256k")
    m = manager(tmp_path, world, async_save=True, staging_root=staging)
    save(m, 1)  # 100 KB staged
    (staging / "filler").write_bytes(bytes(200_000))  # what else lives in the pod's /dev/shm
    with pytest.raises(UserError, match=f"needs 0.1 MiB in {staging}.*async_save=false"):
        save(m, 2)
    with pytest.raises(UserError, match="async checkpoint staging failed"):
        save(manager(tmp_path / "big", world, async_save=True, staging_root=staging), 1, SelfWritingEngine(100_000))


def test_the_manifest_lists_each_ranks_files_and_host(tmp_path, world) -> None:
    manifest = read_manifest(save(manager(tmp_path, world), 3))
    assert manifest["ranks"]["0"]["files"] == sorted(manifest["files"])
    assert {"engine/weights.pt", "rank_00000.pt", "state.json"} <= manifest["files"].keys()
    assert json.loads((tmp_path / "checkpoints" / "step_000003" / "state.json").read_text())["step"] == 3
