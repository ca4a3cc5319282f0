"""Diffusion and GAN through the whole platform on 2 gloo ranks (torchrun, real digit shards, real engines):
the diffusion loss (a DiT with a MoE block, its experts split over the 2 ranks, DeepSpeed ZeRO-2) falls, the
GAN trains without NaN with R1, and kill -9 then resume ends bitwise equal to an uninterrupted run in every
checkpointed tensor: both networks, both optimizers, the EMA (each EP rank's experts), the RNG states."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch

from ember.data.build_images import build_image_shards
from tests.helpers.distributed import free_port
from tests.helpers.runs import events

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 24, 4
DIT_MOE = ("model={family: diffusion, backbone: dit, width: 32, depth: 2, heads: 4, patch_size: 2, timesteps: 100, "
           "sample_steps: 5, ema: {decay: 0.9}, moe: {num_experts: 4, every_n_layers: 2, ep_size: 2, impl: ember}}")
FAMILIES = {
    # A DiT whose 2nd block is ember's MoE layer with its 4 experts split over the 2 ranks (ep_size 2), under
    # DeepSpeed ZeRO-2; each rank's EMA copy averages its own experts.
    "diffusion": ("tiny-diffusion", [DIT_MOE, "engine={kind: deepspeed, zero_stage: 2}", "optim.lr=3e-3"]),
    # DeepSpeed for both networks, each with its own ZeRO stage: two DeepSpeed engines in one process.
    "gan": ("tiny-gan", ["engine={kind: deepspeed, zero_stage: 1, grad_clip: null}",
                         "model.discriminator.engine={kind: deepspeed, zero_stage: 2, grad_clip: 1.0}"]),
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "shards"
    build_image_shards(out, "digits", shard_size=100)
    return out


def command(family: str, run_dir: Path, shards: Path) -> list[str]:
    job, extra = FAMILIES[family]
    items = [f"run_dir={run_dir}", f"data.train.urls={shards}/train-{{000000..000014}}.tar",
             f"data.val.urls={shards}/val-000000.tar", "data.build=null", f"schedule.steps={STEPS}",
             f"checkpoint.every_n_steps={EVERY}", "logging.log_every=1", *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            "-m", "ember.train.torchrun", str(REPO / "jobs" / "debug" / f"{job}.yaml"),
            *[part for item in items for part in ("--set", item)]]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def runs(request, digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run, and one killed (SIGKILL to every process) after its first checkpoint, then resumed."""
    family, root = request.param, tmp_path_factory.mktemp(request.param)
    reference = root / "reference"
    done = subprocess.run(command(family, reference, digits), capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    killed = root / "killed"
    process = subprocess.Popen(command(family, killed, digits), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=ENV)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoints" / f"step_{EVERY:06d}").is_dir():
            assert process.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        # torchrun starts its workers in their own sessions: kill the launcher and every descendant.
        victims = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        psutil.wait_procs([p for p in map(_process, victims) if p is not None], timeout=30)
    interrupted = not any(e["kind"] == "done" for e in events(killed))
    resumed = subprocess.run(command(family, killed, digits), capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"family": family, "reference": reference, "killed": killed, "interrupted": interrupted}


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def test_diffusion_loss_falls_and_gan_trains_without_nan_with_r1(runs) -> None:
    logs = [e for e in events(runs["reference"]) if e["kind"] == "log"]
    assert len(logs) == STEPS
    assert all(np.isfinite(e["loss"]) and np.isfinite(e["grad_norm"]) for e in logs)
    if runs["family"] == "diffusion":
        first, last = np.mean([e["loss"] for e in logs[:3]]), np.mean([e["loss"] for e in logs[-3:]])
        assert last < 0.8 * first, (first, last)
        assert all(0.5 < e["aux_loss"] < 4 for e in logs)  # the MoE block's balance loss, logged beside
        manifest = json.loads((runs["reference"] / "checkpoints" / f"step_{STEPS:06d}" / "manifest.json").read_text())
        assert manifest["placement"]["layers"] == {"1": {"0": 0, "1": 0, "2": 1, "3": 1}}  # block 1, 2 EP ranks
    else:
        r1 = [e["r1"] for e in logs if "r1" in e]
        assert len(r1) == STEPS // 2  # lazy: every r1_interval=2 steps
        assert all(np.isfinite(r1))
        assert max(r1) > 0
        assert all(np.isfinite(e["g_loss"]) for e in logs)
    assert (runs["reference"] / "samples" / f"step_{STEPS:06d}.png").is_file()


def test_kill_9_and_resume_is_bitwise_equal_in_every_checkpointed_tensor(runs) -> None:
    assert runs["interrupted"], "the run finished before the kill; nothing was resumed"
    resumes = [e for e in events(runs["killed"]) if e["kind"] == "resume"]
    assert resumes
    assert resumes[-1]["step"] in range(EVERY, STEPS, EVERY)
    final = f"step_{STEPS:06d}"
    expected_files = checkpoint_files(runs["reference"] / "checkpoints" / final)
    got_files = checkpoint_files(runs["killed"] / "checkpoints" / final)
    assert sorted(got_files) == sorted(expected_files)
    engines = {"diffusion": {"."}, "gan": {"generator", "discriminator"}}[runs["family"]]
    assert {Path(name).parts[1] if name.count("/") > 1 else "." for name in expected_files if "engine/" in name
            and not name.endswith("ema.pt")} == engines
    assert "engine/ema.pt" in expected_files
    assert any("optim" in name for name in expected_files)
    for name, path in expected_files.items():
        assert_same(torch.load(got_files[name], weights_only=False), torch.load(path, weights_only=False), name)


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Every torch file of a checkpoint (engines, EMA, per-rank RNG), by path inside the checkpoint."""
    return {str(path.relative_to(folder)): path for path in folder.rglob("*.pt")}


def assert_same(got: Any, expected: Any, where: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == expected.dtype, where
        assert torch.equal(got, expected), where
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(got, expected), where
    elif isinstance(expected, dict):
        assert set(got) == set(expected), (where, set(got) ^ set(expected))
        for key in expected:
            assert_same(got[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for index, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
            assert_same(mine, theirs, f"{where}[{index}]")
    elif hasattr(expected, "__dict__") and not isinstance(expected, type):  # e.g. DeepSpeed's LossScaler
        assert type(got) is type(expected), where
        assert_same(vars(got), vars(expected), where)
    else:
        assert got == expected, (where, got, expected)


def test_ember_eval_reports_mean_and_spread_over_seeds(runs, tmp_path: Path) -> None:
    run_dir = runs["reference"]
    env = {**ENV, "EMBER_HOME": str(tmp_path.parent / "ember-home")}  # the classifier is cached across tests
    guidance = ["--guidance", "1,2"] if runs["family"] == "diffusion" else []
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "-m", "ember.cli", "eval", str(run_dir), "--n", "40", "--seeds", "0,1",
                             "--out", str(out), *guidance], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    rows = {(row["model"], row["guidance"]) for row in report["results"]}
    expected = {("ema", 1.0), ("ema", 2.0)} if runs["family"] == "diffusion" else {("ema", None), ("raw", None)}
    assert rows == expected
    assert report["seeds"] == [0, 1]
    assert report["step"] == STEPS
    for row in report["results"]:
        for metric in ("fd", "accuracy"):
            per_seed = row[metric]["per_seed"]
            assert len(per_seed) == 2
            assert row[metric]["mean"] == pytest.approx(np.mean(per_seed))  # the spread is over the seeds' own values
            assert row[metric]["std"] == pytest.approx(np.std(per_seed))
        assert row["fd"]["per_seed"][0] != row["fd"]["per_seed"][1]  # two seeds draw two different sample sets

