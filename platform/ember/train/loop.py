"""The rank-local training loop. Every worker runs `train_worker`; the whole step fits on one screen."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ember.checkpoint.fence import start_attempt
from ember.checkpoint.manager import CheckpointManager, Retention, read_state
from ember.checkpoint.placement import expert_placement, gather_hosts
from ember.data.cursor import merge_states
from ember.data.loader import build_stream
from ember.engines import build_engine
from ember.errors import UserError
from ember.models import build_model
from ember.observe.moe_stats import log_routing, mean_over_ranks, routing_stats
from ember.observe.progress import Reporter
from ember.observe.tensorboard import TensorBoardLogger
from ember.serve.sampling import decode_bytes, sample_tokens
from ember.spec import JobSpec
from ember.train.objectives.lm import lm_loss, split_batch
from ember.train.preemption import PreemptionWatch
from ember.world import World, world_from_env


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of every training worker (Ray Train, torchrun or a test's spawned ranks)."""
    spec = JobSpec.model_validate(config["spec"])
    moe = spec.model.moe
    world = world_from_env(spec.cluster.device, ep_size=moe.ep_size if moe else 1)
    torch.set_num_threads(max(1, int(spec.cluster.cpus_per_worker)))
    run_dir = Path(config["run_dir"])
    reporter = Reporter(config.get("queue"), world.is_main, run_dir / "events.jsonl")
    trainer = Trainer(spec, world, run_dir, reporter)
    return trainer.fit()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, spec: JobSpec, world: World, run_dir: Path, reporter: Reporter) -> None:
        self.spec, self.world, self.run_dir, self.reporter = spec, world, run_dir, reporter
        seed_everything(spec.schedule.seed)
        self.model = build_model(spec.model, ep_rank=world.ep_rank, seed=spec.schedule.seed).to(world.device)
        self.engine = build_engine(spec, self.model, world)
        self.train_stream = build_stream(spec.data, spec.model, spec.schedule.micro_batch, world.rank, world.world_size)
        self.batches = iter(self.train_stream)
        self.preemption = PreemptionWatch(run_dir, world)
        self.preemption.clear_stale_request()
        self.checkpoints = self._checkpoint_manager(spec, world, run_dir)
        self.tensorboard = TensorBoardLogger(run_dir / "tensorboard", spec.logging.tensorboard and world.is_main)
        self.step = 0
        self.skipped_samples = 0
        self.metrics: dict[str, Any] = {}

    def _checkpoint_manager(self, spec: JobSpec, world: World, run_dir: Path) -> CheckpointManager:
        attempt = [start_attempt(run_dir) if world.is_main else None]
        if world.world_size > 1:
            dist.broadcast_object_list(attempt, src=0)
        facts = {"spec_hash": spec.fingerprint(), "engine": spec.engine.kind, "spec": spec.model_dump(mode="json")}
        facts["code_version"] = code_version()
        facts["placement"] = expert_placement(spec.model, world, gather_hosts(world))
        return CheckpointManager(
            run_dir / "checkpoints", world, Retention(spec.checkpoint.keep_last, spec.checkpoint.keep_every), facts,
            attempt=attempt[0], run_dir=run_dir, async_save=spec.checkpoint.async_save,
        )

    def fit(self) -> dict[str, Any]:
        self.resume()
        total = self.spec.schedule.steps
        self.reporter.emit(
            "start", step=self.step, total=total, world_size=self.world.world_size, device=str(self.world.device)
        )
        window_start, window_steps = time.perf_counter(), 0
        while self.step < total:
            stats = self.train_step()
            self.step += 1
            window_steps += 1
            self.tensorboard.scalars(self.step, stats, prefix="train/")
            self.reporter.emit("step", step=self.step, loss=stats["loss"])
            if self.step % self.spec.logging.log_every == 0 or self.step == total:
                elapsed = time.perf_counter() - window_start
                stats["tokens_per_s"] = window_steps * self.tokens_per_step / max(elapsed, 1e-9)
                self.tensorboard.scalars(self.step, {"tokens_per_s": stats["tokens_per_s"]}, prefix="train/")
                self.reporter.emit("log", step=self.step, total=total, **stats)
                self.metrics.update(loss=stats["loss"], tokens_per_s=stats["tokens_per_s"])
                self.log_skipped_samples()
                self.log_routing()
                window_start, window_steps = time.perf_counter(), 0
            self.maybe_log_histograms()
            if self.step % self.spec.schedule.eval_every == 0 or self.step == total:
                self.evaluate()
            saved = self.step % self.spec.checkpoint.every_n_steps == 0 or self.step == total
            if saved:
                self.save()
            if self.step < total and self.preemption.should_stop():
                if not saved:
                    self.save()
                return self.stop_preempted()
        self.checkpoints.wait()
        self.generate_sample()
        self.tensorboard.close()
        self.metrics["step"] = self.step
        self.reporter.emit("done", metrics=self.metrics)
        return self.metrics

    @property
    def tokens_per_step(self) -> int:
        return self.spec.global_batch * self.spec.model.seq_len

    def train_step(self) -> dict[str, float]:
        """One optimizer step: forward/backward over the accumulation micro-batches, then step."""
        aux_weight = self.spec.model.moe.aux_loss_weight if self.spec.model.moe else 0.0
        totals = torch.zeros(2, dtype=torch.float64, device=self.world.device)
        for _ in range(self.spec.grad_accumulation):
            inputs, targets = split_batch(next(self.batches).to(self.world.device, non_blocking=True))
            loss, parts = lm_loss(self.engine.forward(inputs), targets, aux_weight)
            self.engine.backward(loss)
            totals += torch.stack([parts["ce"], parts["aux_loss"]]).double()
        grad_norm = self.engine.step()
        totals = self.all_reduce_mean(totals / self.spec.grad_accumulation)
        stats = {"loss": totals[0].item(), "grad_norm": float(grad_norm), "lr": self.engine.lr()}
        if self.spec.model.moe:
            stats["aux_loss"] = totals[1].item()
        return stats

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks, returned on the host (one sync per call)."""
        values = values.to(self.world.device)
        if self.world.world_size > 1:
            dist.all_reduce(values)
        return values.cpu() / self.world.world_size

    @torch.no_grad()
    def evaluate(self) -> None:
        if self.spec.data.val is None:
            return
        # Every rank reads the same held-out rows: a val set is small (often one shard) and MoE ranks
        # must run their forward passes in lockstep anyway.
        batches = build_stream(self.spec.data, self.spec.model, self.spec.schedule.micro_batch, 0, 1, split="val")
        self.engine.module.eval()
        total = torch.zeros(1, dtype=torch.float64, device=self.world.device)
        for _ in range(self.spec.schedule.eval_batches):
            inputs, targets = split_batch(next(batches).to(self.world.device))
            _, parts = lm_loss(self.engine.forward(inputs), targets, 0.0)
            total += parts["ce"].double()
        self.engine.module.train()
        val_loss = self.all_reduce_mean(total / self.spec.schedule.eval_batches).item()
        self.tensorboard.scalars(self.step, {"loss": val_loss}, prefix="val/")
        self.reporter.emit("eval", step=self.step, val_loss=val_loss)
        self.metrics["val_loss"] = val_loss

    def log_skipped_samples(self) -> None:
        """data/skipped: samples all ranks passed over under data.on_error=skip, logged when it changes."""
        count = self.all_reduce_mean(torch.tensor([float(self.train_stream.skipped)], dtype=torch.float64))
        total = round(count.item() * self.world.world_size)
        if total != self.skipped_samples:
            self.skipped_samples = total
            self.tensorboard.scalars(self.step, {"skipped": total}, prefix="data/")

    def log_routing(self) -> None:
        """Per MoE layer: expert load, drops, losses, entropy of the last micro-batch, averaged over ranks."""
        stats = mean_over_ranks(routing_stats(self.engine.module))
        if stats and self.world.is_main:
            log_routing(self.tensorboard, self.step, stats)

    def maybe_log_histograms(self) -> None:
        every = self.spec.logging.histograms_every
        if every and self.step % every == 0 and self.world.is_main:
            for name, param in self.engine.module.named_parameters():
                if param.numel():
                    self.tensorboard.histogram(self.step, f"weights/{name}", param)

    def save(self) -> None:
        cursors = [None] * self.world.world_size
        state = self.train_stream.state()
        if self.world.world_size > 1:
            dist.all_gather_object(cursors, state)
        else:
            cursors = [state]
        shared = {"data": merge_states(cursors), "world_size": self.world.world_size}
        saved = self.checkpoints.save(self.step, self.engine, shared, {"rng": rng_state()})
        self.tensorboard.scalars(self.step, {"stall_s": saved.stall_s}, prefix="checkpoint/")
        self.reporter.emit("checkpoint", step=self.step, path=str(saved.path), stall_s=saved.stall_s,
                           background=self.spec.checkpoint.async_save)

    def stop_preempted(self) -> dict[str, Any]:
        """Checkpoint committed; stop cleanly so the scheduler (or `ember run` again) resumes from it."""
        self.checkpoints.wait()
        self.world.barrier()
        self.tensorboard.close()
        self.metrics.update(step=self.step, preempted=True)
        self.reporter.emit("preempted", step=self.step)
        self.reporter.emit("done", metrics=self.metrics)
        return self.metrics

    def resume(self) -> None:
        path = self.resume_path()
        if path is None:
            return
        state = read_state(path)
        saved_world = state["world_size"]
        if saved_world != self.world.world_size and not self.engine.reshards_on_load:
            raise UserError(
                f"{path} was saved by {saved_world} workers, this run has {self.world.world_size}, and engine "
                f"{self.spec.engine.kind} cannot reshard its checkpoint; set cluster.num_workers={saved_world}"
            )
        self.engine.load(path / "engine")
        self.train_stream.load_state(state["data"])  # slots keep their positions on any world size
        self.batches = iter(self.train_stream)
        rank_file = path / f"rank_{self.world.rank:05d}.pt"
        if rank_file.is_file():  # a rank the saving world did not have keeps its fresh seed
            set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
        self.step = state["step"]
        self.reporter.emit("resume", step=self.step, path=str(path), saved_world_size=saved_world)

    def resume_path(self) -> Path | None:
        mode = self.spec.checkpoint.resume
        if mode == "never":
            return None
        if mode == "auto":
            found = self.checkpoints.latest_valid(checksums=self.spec.checkpoint.verify_checksums)
            for folder, problems in self.checkpoints.skipped:
                self.reporter.emit("skipped_checkpoint", path=str(folder), problem=problems[0])
            return found
        path = Path(mode)
        if not (path / "manifest.json").is_file():
            raise UserError(f"checkpoint.resume: {path} is not a committed checkpoint folder (no manifest.json)")
        return path

    def generate_sample(self) -> None:
        """Every rank generates (MoE layers exchange tokens), rank 0 reports the text."""
        log = self.spec.logging
        if log.sample_tokens == 0:
            return
        self.engine.module.eval()
        tokens = sample_tokens(
            lambda ids: self.engine.forward(ids).logits,
            list(log.sample_prompt.encode()),
            log.sample_tokens,
            self.spec.model.seq_len,
            log.sample_temperature,
            top_k=None,
            seed=self.spec.schedule.seed,
            device=self.world.device,
        )
        self.engine.module.train()
        text = log.sample_prompt + decode_bytes(tokens)
        self.tensorboard.text(self.step, "sample", text)
        self.reporter.emit("sample", step=self.step, text=text)
        self.metrics["sample"] = text


def code_version() -> str:
    import ember

    return ember.__version__


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
