"""Checkpoints: atomic commit, verification with fallback, fencing, retention, async save, kill -9 mid-save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ember.checkpoint.fence import start_attempt
from ember.checkpoint.manager import CheckpointManager, Retention, read_state
from ember.checkpoint.manifest import read_manifest, verify_manifest
from ember.cli import main
from ember.engines import build_engine
from ember.errors import InternalError, UserError
from ember.models import build_model
from ember.spec import JobSpec
from ember.world import local_world


@pytest.fixture(scope="module")
def engine():
    """A real (one-rank DDP) engine of a tiny GPT: what the trainer hands the manager."""
    world = local_world()
    spec = JobSpec.from_dict({
        "name": "ckpt-test", "model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "seq_len": 8},
        "data": {"train": {"urls": "unused.tar"}}, "engine": {"kind": "ddp"},
        "cluster": {"num_workers": 1, "device": "cpu"},
    })
    return build_engine(spec, build_model(spec.model), world), world


def manager(root: Path, world, **kwargs) -> CheckpointManager:
    return CheckpointManager(root / "checkpoints", world, run_dir=root, **kwargs)


def save(m: CheckpointManager, step: int, engine) -> Path:
    result = m.save(step, engine, {"data": {"cursor": step}, "world_size": 1}, {"rng": torch.get_rng_state()})
    m.wait()
    return result.path


def test_sync_save_commits_a_verified_checkpoint(tmp_path: Path, engine) -> None:
    eng, world = engine
    path = save(manager(tmp_path, world), 7, eng)
    assert path.name == "step_000007"
    assert verify_manifest(path) == []
    assert read_state(path) == {"step": 7, "data": {"cursor": 7}, "world_size": 1}
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_async_save_commits_the_same_files_after_wait(tmp_path: Path, engine) -> None:
    eng, world = engine
    sync_path = save(manager(tmp_path / "sync", world), 3, eng)
    async_path = save(manager(tmp_path / "async", world, async_save=True), 3, eng)
    files = {p.relative_to(sync_path) for p in sync_path.rglob("*") if p.is_file()}
    assert files == {p.relative_to(async_path) for p in async_path.rglob("*") if p.is_file()}
    assert verify_manifest(async_path) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path, engine, damage, capsys) -> None:
    eng, world = engine
    m = manager(tmp_path, world)
    save(m, 1, eng)
    newest = save(m, 2, eng)
    victim = newest / "engine" / "model.pt"
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        victim.unlink()
    assert m.latest_valid().name == "step_000001"
    assert m.skipped
    assert m.skipped[0][0] == newest
    assert "model.pt" in m.skipped[0][1][0]
    with pytest.raises(SystemExit) as exited:
        main(["ckpt", "verify", str(tmp_path)])
    assert exited.value.code == 2
    assert "model.pt" in capsys.readouterr().err


@pytest.mark.parametrize("manifest", ["[]", '{"step": 2}', '{"step": 2, "files": {}}', '{"files": {"x": 1}}'])
def test_a_manifest_without_a_file_list_is_invalid_not_a_crash_or_a_pass(tmp_path, engine, manifest) -> None:
    eng, world = engine
    m = manager(tmp_path, world)
    save(m, 1, eng)
    (save(m, 2, eng) / "manifest.json").write_text(manifest)
    assert verify_manifest(tmp_path / "checkpoints" / "step_000002")
    assert m.latest_valid().name == "step_000001"


def test_ckpt_verify_checks_every_checkpoint_not_only_the_newest(tmp_path, engine, capsys) -> None:
    eng, world = engine
    m = manager(tmp_path, world)
    for step in (1, 2, 3):
        save(m, step, eng)
    truncate(tmp_path / "checkpoints" / "step_000001")
    with pytest.raises(SystemExit) as exited:
        main(["ckpt", "verify", str(tmp_path)])
    captured = capsys.readouterr()
    assert exited.value.code == 2
    assert "step_000001: BAD" in captured.err
    assert "model.pt" in captured.err
    assert "step_000003: ok" in captured.out
    assert "step_000002: ok" in captured.out


def test_a_leftover_tmp_folder_is_never_resumed_from(tmp_path: Path, engine) -> None:
    eng, world = engine
    m = manager(tmp_path, world)
    save(m, 1, eng)
    half = tmp_path / "checkpoints" / "step_000002.tmp"
    (half / "engine").mkdir(parents=True)
    (half / "engine" / "model.pt").write_bytes(b"half written")
    assert m.latest_valid().name == "step_000001"
    assert save(m, 2, eng).name == "step_000002"  # a later save of the same step replaces the leftover
    assert verify_manifest(tmp_path / "checkpoints" / "step_000002") == []


def test_a_stale_attempt_cannot_commit(tmp_path: Path, engine) -> None:
    eng, world = engine
    old = manager(tmp_path, world, attempt=start_attempt(tmp_path))
    save(old, 1, eng)
    start_attempt(tmp_path)  # Ray restarted the workers: a newer attempt owns the run now
    with pytest.raises(InternalError, match="attempt 1 is stale"):
        save(old, 2, eng)
    assert [p.name for p in old.committed()] == ["step_000001"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_retention_keeps_last_n_and_every_mth(tmp_path: Path, engine) -> None:
    eng, world = engine
    m = manager(tmp_path, world, retention=Retention(keep_last=2, keep_every=4))
    for step in range(1, 9):
        save(m, step, eng)
    assert [p.name for p in m.committed()] == ["step_000008", "step_000007", "step_000004"]


def truncate(checkpoint: Path) -> None:
    victim = checkpoint / "engine" / "model.pt"
    victim.write_bytes(victim.read_bytes()[:100])


def test_retention_never_deletes_the_checkpoint_just_committed_for_a_corrupt_newer_step(tmp_path, engine) -> None:
    eng, world = engine
    m = manager(tmp_path, world, retention=Retention(keep_last=1))
    save(m, 200, eng)
    truncate(save(m, 300, eng))  # with keep_last=1, 200 went at 300's commit
    m = manager(tmp_path, world, retention=Retention(keep_last=1))  # the restarted run
    save(m, 250, eng)  # it commits a lower step
    assert [p.name for p in m.committed()] == ["step_000250", "step_000300"]
    assert m.latest_valid().name == "step_000250"


def test_retention_counts_only_this_lineage_and_ranks_by_commit_order(tmp_path, engine) -> None:
    eng, world = engine
    old = manager(tmp_path, world, retention=Retention(keep_last=3), lineage="old")
    for step in (800, 900, 1000):
        save(old, step, eng)
    new = manager(tmp_path, world, retention=Retention(keep_last=3), lineage="new")  # resume: never
    for step in (100, 200, 300, 400):
        save(new, step, eng)
    names = [p.name for p in new.committed()]
    assert names == ["step_000400", "step_000300", "step_000200", "step_001000", "step_000900", "step_000800"]
    assert new.latest_valid().name == "step_000400"  # the newest commit, not the highest step


SAVER = """
import sys, torch
from pathlib import Path
from ember.checkpoint.manager import CheckpointManager
from ember.world import local_world

class BigEngine:
    def save(self, folder):
        for i in range(4):
            torch.save(torch.full((1000,), float(i)), folder / f"part{i}.pt")

manager = CheckpointManager(Path(sys.argv[1]), local_world())
for step in (1, 2):
    manager.save(step, BigEngine(), {"world_size": 1}, {})
"""


def test_kill_9_during_a_save_leaves_no_committed_partial_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    env = {**os.environ, "EMBER_FAULT": "after_rank_files:0:2"}  # step 2's files written, nothing reported
    saver = subprocess.run([sys.executable, "-c", SAVER, str(root)], env=env, timeout=120)
    assert saver.returncode == -signal.SIGKILL
    m = CheckpointManager(root, world=None)
    assert [p.name for p in m.committed()] == ["step_000001"]
    assert verify_manifest(root / "step_000001") == []
    assert list(root.glob("step_000002.*.tmp"))  # the interrupted save stays an uncommitted .tmp


def test_a_run_restarted_below_a_corrupt_newest_checkpoint_keeps_its_own(tmp_path, tiny_stdlib_shards) -> None:
    """The issue's user flow: keep_last 1, the newest checkpoint (30) truncated, the same job run again to
    step 25: it trains from scratch and its commits 10, 20, 25 must not be retired in favour of step 30."""
    from ember.train.loop import train_worker

    local_world()
    spec = JobSpec.load(Path(__file__).resolve().parents[2] / "jobs" / "debug" / "tiny-dense.yaml", [
        f"run_dir={tmp_path}", f"data.train.urls={tiny_stdlib_shards}/train-{{000000..000003}}.tar", "data.val=null",
        "data.build=null", "model.d_model=16", "model.n_layers=1", "schedule.micro_batch=2", "schedule.global_batch=2",
        "cluster.num_workers=1", "checkpoint.every_n_steps=10", "checkpoint.keep_last=1", "logging.sample_every=0",
        "logging.sample_tokens=0", "schedule.steps=30",
    ])
    train_worker({"spec": spec.model_dump(mode="json"), "run_dir": str(tmp_path)})
    truncate(tmp_path / "checkpoints" / "step_000030")
    rerun = spec.model_copy(update={"schedule": spec.schedule.model_copy(update={"steps": 25})})
    train_worker({"spec": rerun.model_dump(mode="json"), "run_dir": str(tmp_path)})
    m = CheckpointManager(tmp_path / "checkpoints", world=None)
    assert [p.name for p in m.committed()] == ["step_000025", "step_000030"]
    assert m.latest_valid().name == "step_000025"


def saved_run(tmp_path: Path, engine) -> None:
    """A run folder whose checkpoint records the spec that saved it, as `ember run` leaves it."""
    from ember.train.launch import prepare_run_dir

    eng, world = engine
    spec = JobSpec.from_dict({
        "name": "resume-check", "run_dir": str(tmp_path), "model": {"d_model": 16, "n_heads": 2, "n_layers": 1},
        "data": {"train": {"urls": str(tmp_path / "unused.tar")}}, "engine": {"kind": "ddp"},
        "schedule": {"micro_batch": 8, "global_batch": 32}, "cluster": {"num_workers": 2, "device": "cpu"},
    })
    prepare_run_dir(spec)
    facts = {"spec": spec.model_dump(mode="json")}
    m = CheckpointManager(tmp_path / "checkpoints", world, facts=facts, run_dir=tmp_path)
    save(m, 5, eng)


@pytest.mark.parametrize(("change", "field"), [
    ("model.n_heads=4", "model.n_heads"),  # same tensor shapes, another function
    ("model.moe={num_experts: 2, top_k: 2}", "model.moe"),  # MoE routing
    ("data.train.urls=/elsewhere/shard.tar", "data.train.urls"),  # another data source
])
def test_resume_refuses_a_spec_change_that_changes_the_function(tmp_path, engine, capsys, change, field) -> None:
    saved_run(tmp_path, engine)
    with pytest.raises(SystemExit) as exited:
        main(["resume", str(tmp_path), "--check", "--set", change])
    captured = capsys.readouterr()
    assert exited.value.code == 2
    assert f"refused: {field}" in captured.out
    assert "resume refused" in captured.err
    with pytest.raises(SystemExit) as exited:
        main(["resume", str(tmp_path), "--check", "--set", change, "--allow-spec-change", field])
    assert exited.value.code in (0, None)
    assert "refused" not in capsys.readouterr().out


def test_a_training_resume_refuses_a_function_change_too(tmp_path, engine) -> None:
    from ember.train.resume import check_spec_compatible

    saved_run(tmp_path, engine)
    checkpoint = tmp_path / "checkpoints" / "step_000005"
    spec = JobSpec.load(tmp_path / "spec.yaml", ["model.n_heads=4"])
    with pytest.raises(UserError, match="changed model.n_heads.*--allow-spec-change model.n_heads"):
        check_spec_compatible(checkpoint, read_manifest(checkpoint)["spec"], spec)
    allowed = JobSpec.load(tmp_path / "spec.yaml", ["model.n_heads=4", "checkpoint.allow_spec_change=[model.n_heads]"])
    check_spec_compatible(checkpoint, read_manifest(checkpoint)["spec"], allowed)


def test_resume_check_reports_checkpoint_reshard_and_spec_changes(tmp_path: Path, engine, capsys) -> None:
    saved_run(tmp_path, engine)
    with pytest.raises(SystemExit) as exited:
        main(["resume", str(tmp_path), "--world-size", "8", "--check"])
    out = capsys.readouterr().out
    assert exited.value.code in (0, None)
    assert "checkpoint: step_000005 (step 5)" in out
    assert "world size 1 -> 8" in out  # this test's one-rank world saved it
    # The global batch (32) stays: accumulation 2 -> 1 and micro-batch 8 -> 4 over 8 workers.
    assert "schedule.micro_batch: 8 -> 4" in out
    assert "cluster.num_workers: 2 -> 8" in out
    assert "data.train" not in out


def test_resume_on_a_world_the_ep_size_does_not_divide_picks_one_that_does() -> None:
    from ember.train.resume import fit_expert_parallelism

    spec = JobSpec.load(Path(__file__).resolve().parents[2] / "jobs" / "quickstart.yaml")  # 4 experts, ep 2
    assert fit_expert_parallelism(spec, 3) == ["model.moe.ep_size=1"]
    assert fit_expert_parallelism(spec, 4) == []
