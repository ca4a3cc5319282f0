"""The rank-local training loop. Every worker runs `train_worker`; the whole step fits on one screen."""

from __future__ import annotations

import importlib.metadata
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ember.checkpoint.fault import fault_point
from ember.checkpoint.fence import start_attempt
from ember.checkpoint.manager import CheckpointManager, Retention, lineage_of, read_state
from ember.checkpoint.manifest import read_manifest
from ember.data.cursor import merge_states
from ember.data.loader import build_stream
from ember.data.tokenizer import checkpoint_copies
from ember.errors import UserError
from ember.observe.images import save_png
from ember.observe.mfu import device_peak_flops, gpt_flops_per_token, model_flops_utilisation
from ember.observe.moe_stats import log_routing, mean_over_ranks, routing_stats
from ember.observe.progress import Reporter
from ember.observe.step_time import StepClock, peak_memory_gb
from ember.observe.tensorboard import TensorBoardLogger
from ember.spec import JobSpec
from ember.train.objectives.base import build_objective
from ember.train.preemption import NodeDrainWatch, PreemptionWatch, ray_node_drain_watch
from ember.train.resume import check_spec_compatible
from ember.world import ExpertPlacement, World, gather_hosts, world_from_env


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of every training worker (Ray Train, torchrun or a test's spawned ranks)."""
    spec = JobSpec.model_validate(config["spec"])
    moe = spec.model.moe
    world = world_from_env(spec.cluster.device, ep_size=moe.ep_size if moe else 1)
    torch.set_num_threads(max(1, int(spec.cluster.cpus_per_worker)))
    run_dir = Path(config["run_dir"])
    reporter = Reporter(config.get("queue"), world.is_main, run_dir / "events.jsonl")
    on_ray = config.get("report_to_ray", False)
    drain = ray_node_drain_watch(world) if on_ray else None  # a draining node stops the job like a SIGTERM
    trainer = Trainer(spec, world, run_dir, reporter, report_to_ray=on_ray, drain=drain)
    return trainer.fit()


class MFUMeter:
    """tokens/s -> model FLOPs utilisation of a GPT run (FLOPs per token and the ranks' peak known up front)."""

    def __init__(self, flops_per_token: float, peak_per_rank: float, ranks: int) -> None:
        self.flops_per_token, self.peak_per_rank, self.ranks = flops_per_token, peak_per_rank, ranks

    @classmethod
    def for_spec(cls, spec: JobSpec, world: World) -> MFUMeter | None:
        if spec.model.family != "gpt":
            return None
        peak = device_peak_flops(world.device, spec.engine.precision, spec.cluster.peak_tflops)
        return cls(gpt_flops_per_token(spec.model), peak, world.world_size)

    def __call__(self, tokens_per_s: float) -> float:
        return model_flops_utilisation(self.flops_per_token, tokens_per_s, self.peak_per_rank, self.ranks)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(
        self, spec: JobSpec, world: World, run_dir: Path, reporter: Reporter, report_to_ray: bool = False,
        drain: NodeDrainWatch | None = None,
    ) -> None:
        self.spec, self.world, self.run_dir, self.reporter = spec, world, run_dir, reporter
        seed_everything(spec.schedule.seed)
        self.placement = world.expert_placement(spec.model, gather_hosts(world))  # built once, handed down
        # the family's models, engines (one per network) and EMA
        self.objective = build_objective(spec, world, self.placement)
        self.train_stream = build_stream(spec.data, spec.model, spec.schedule.micro_batch, world.rank, world.world_size)
        self.batches = iter(self.train_stream)
        self.preemption = PreemptionWatch(run_dir, world, drain)
        self.preemption.clear_stale_request()
        self.checkpoints = self._checkpoint_manager(spec, world, run_dir)
        self.tensorboard = TensorBoardLogger(run_dir / "tensorboard", spec.logging.tensorboard and world.is_main)
        self.step = 0
        self.mfu = MFUMeter.for_spec(spec, world)
        self.skipped_samples = 0
        self.metrics: dict[str, Any] = {}
        self.clock = StepClock()
        for engine in self.objective.engines.values():  # the optimizer's share, timed outside the objective
            engine.step = self.clock.timed("optimizer_s", engine.step)
        self.report_to_ray = report_to_ray

    def _checkpoint_manager(self, spec: JobSpec, world: World, run_dir: Path) -> CheckpointManager:
        attempt = [start_attempt(run_dir) if world.is_main else None]
        if world.world_size > 1:
            dist.broadcast_object_list(attempt, src=0)
        facts = {"spec_hash": spec.fingerprint(), "engine": spec.engine.kind, "spec": spec.model_dump(mode="json")}
        facts["code_version"] = code_version()
        facts["placement"] = placement_record(spec, self.placement)
        manager = CheckpointManager(
            run_dir / "checkpoints", world, Retention(spec.checkpoint.keep_last, spec.checkpoint.keep_every), facts,
            attempt=attempt[0], run_dir=run_dir, async_save=spec.checkpoint.async_save,
            verify_checksums=spec.checkpoint.verify_checksums,
            copies=checkpoint_copies(spec),
        )
        manager.clean_stale()
        world.barrier()  # leftovers of dead attempts are gone (and a half-replaced step restored) before resume
        return manager

    def fit(self) -> dict[str, Any]:
        self.resume()
        total = self.spec.schedule.steps
        self.reporter.emit(
            "start", step=self.step, total=total, world_size=self.world.world_size, device=str(self.world.device)
        )
        window_start, window_steps = time.perf_counter(), 0
        rate = self.objective.throughput_name
        while self.step < total:
            stats = self.train_step()
            self.step += 1
            window_steps += 1
            self.tensorboard.scalars(self.step, stats, prefix="train/")
            self.reporter.emit("step", step=self.step, loss=stats["loss"])
            if self.step % self.spec.logging.log_every == 0 or self.step == total:
                elapsed = time.perf_counter() - window_start
                stats[rate] = window_steps * self.objective.items_per_step / max(elapsed, 1e-9)
                if self.mfu is not None:
                    stats["mfu"] = self.mfu(stats[rate])
                speed = {name: stats[name] for name in (rate, "mfu") if name in stats}
                self.tensorboard.scalars(self.step, speed, prefix="train/")
                stats |= self.log_step_time()
                self.reporter.emit("log", step=self.step, total=total, **stats)
                self.metrics.update(loss=stats["loss"], **{rate: stats[rate]})
                self.log_skipped_samples()
                self.log_routing()
                window_start, window_steps = time.perf_counter(), 0
            self.maybe_log_histograms()
            if self.step % self.spec.schedule.eval_every == 0 or self.step == total:
                self.evaluate()
            every = self.spec.logging.sample_every
            if every and self.step % every == 0 and self.step < total:
                self.log_sample()
            saved = self.step % self.spec.checkpoint.every_n_steps == 0 or self.step == total
            if saved:
                self.save()
            fault_point("step_end", self.world.rank, self.step)  # tests kill, pause or preempt a rank here
            stop = self.preemption.should_stop() if self.step < total else None
            if stop is not None:
                if not saved:
                    self.save()
                return self.stop_preempted(stop)
        self.checkpoints.wait()
        self.log_sample()
        self.tensorboard.close()
        self.metrics["step"] = self.step
        self.report_to_ray_train()
        self.reporter.emit("done", metrics=self.metrics)
        return self.metrics

    def train_step(self) -> dict[str, float]:
        """One optimizer step of the family's objective; its losses averaged over ranks in one all-reduce."""
        start = time.perf_counter()
        means, host = self.objective.train_step(self.clock.timed("data_s", lambda: next(self.batches)), self.step)
        self.clock.end_step(time.perf_counter() - start)
        reduced = self.all_reduce_mean(torch.stack([value.double().reshape(()) for value in means.values()]))
        return {name: reduced[i].item() for i, name in enumerate(means)} | host

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks, returned on the host (one sync per call)."""
        values = values.to(self.world.device)
        if self.world.world_size > 1:
            dist.all_reduce(values)
        return values.cpu() / self.world.world_size

    def log_step_time(self) -> dict[str, float]:
        """This rank's mean step split over the logging window and its peak memory, to TensorBoard and the log."""
        split = self.clock.window() | {"peak_memory_gb": peak_memory_gb(self.world.device)}
        self.tensorboard.scalars(self.step, split, prefix="time/")
        return split

    def report_to_ray_train(self) -> None:
        """The run's final metrics to Ray Train (its Result.metrics and dashboard), once, from every rank (Ray Train
        waits for all). Not per log step: Ray Train's worker hands a report to a queue of one that its controller
        empties when it polls (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a second report within one poll
        blocks training until then (1-2 s per log step measured with the 2 s default). ember's progress, logs and
        TensorBoard come from its own reporter, not from these reports."""
        if self.report_to_ray:
            import ray.train

            ray.train.report({k: v for k, v in self.metrics.items() if isinstance(v, int | float)})

    @torch.no_grad()
    def evaluate(self) -> None:
        if self.spec.data.val is None:
            return
        # Every rank reads the same held-out rows: a val set is small (often one shard) and MoE ranks
        # must run their forward passes in lockstep anyway.
        batches = build_stream(self.spec.data, self.spec.model, self.spec.schedule.micro_batch, 0, 1, split="val")
        total = self.objective.eval_loss(lambda: next(batches), self.spec.schedule.eval_batches)
        batches.close()
        val_loss = self.all_reduce_mean(total).item()
        extras = getattr(self.objective, "eval_extras", {})  # the LM's bits per byte
        self.tensorboard.scalars(self.step, {"loss": val_loss, **extras}, prefix="val/")
        self.reporter.emit("eval", step=self.step, val_loss=val_loss, unit=self.objective.loss_unit, **extras)
        self.metrics.update({f"val_{name}": value for name, value in extras.items()})
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
        stats = {}
        for engine in self.objective.engines.values():
            stats.update(routing_stats(engine.module))
        stats = mean_over_ranks(stats)
        if stats and self.world.is_main:
            log_routing(self.tensorboard, self.step, stats)

    def maybe_log_histograms(self) -> None:
        every = self.spec.logging.histograms_every
        if every and self.step % every == 0 and self.world.is_main:
            for model, engine in self.objective.engines.items():
                prefix = "weights/" if len(self.objective.engines) == 1 else f"weights/{model}/"
                for name, param in engine.module.named_parameters():
                    if param.numel():
                        self.tensorboard.histogram(self.step, f"{prefix}{name}", param)

    def save(self) -> None:
        cursors = [None] * self.world.world_size
        state = self.train_stream.state()
        if self.world.world_size > 1:
            dist.all_gather_object(cursors, state)
        else:
            cursors = [state]
        shared = {"data": merge_states(cursors), "world_size": self.world.world_size}
        saved = self.checkpoints.save(self.step, self.objective.parts, shared, {"rng": rng_state()})
        self.tensorboard.scalars(self.step, {"stall_s": saved.stall_s}, prefix="checkpoint/")
        self.clock.add("checkpoint_s", saved.stall_s)
        self.reporter.emit("checkpoint", step=self.step, path=str(saved.path), stall_s=saved.stall_s,
                           background=self.spec.checkpoint.async_save)

    def stop_preempted(self, reason: str) -> dict[str, Any]:
        """Checkpoint committed; stop cleanly so the scheduler (or `ember run` again, or the driver's next attempt
        when a node drains) resumes from it."""
        self.checkpoints.wait()
        self.world.barrier()
        self.tensorboard.close()
        self.metrics.update(step=self.step, preempted=True, preempted_by=reason)
        self.report_to_ray_train()
        self.reporter.emit("preempted", step=self.step, reason=reason)
        self.reporter.emit("done", metrics=self.metrics)
        return self.metrics

    def resume(self) -> None:
        path = self.resume_path()
        self.checkpoints.lineage = self.lineage_after(path)
        if path is None:
            return
        check_spec_compatible(path, (read_manifest(path) or {}).get("spec", {}), self.spec)
        state = read_state(path)
        saved_world = state["world_size"]
        if saved_world != self.world.world_size and not self.objective.parts.reshards_on_load:
            why = self.objective.parts.reshard_refusal()
            raise UserError(
                f"{path} was saved by {saved_world} workers, this run has {self.world.world_size}, and engine "
                f"{self.spec.engine.kind} cannot reshard its checkpoint{f' ({why})' if why else ''}; "
                f"set cluster.num_workers={saved_world}"
            )
        self.objective.parts.load(path / "engine")
        self.train_stream.load_state(state["data"])  # slots keep their positions on any world size
        self.batches = iter(self.train_stream)
        rank_file = path / f"rank_{self.world.rank:05d}.pt"
        if rank_file.is_file():  # a rank the saving world did not have keeps its fresh seed
            set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
        self.step = state["step"]
        self.reporter.emit("resume", step=self.step, path=str(path), saved_world_size=saved_world)

    def lineage_after(self, path: Path | None) -> str | None:
        """Continue the resumed checkpoint's history when it is the newest valid commit; else (from scratch,
        or a branch from an older checkpoint) start one, so retention never trades the new history for the old.
        Only rank 0 commits, so only it looks."""
        if path is None:
            return self.checkpoints.attempt.id
        if self.spec.checkpoint.resume == "auto":  # the newest valid commit by definition
            return lineage_of(path)
        newest = self.checkpoints.latest_valid(checksums=False) if self.world.is_main else None
        return lineage_of(path) if newest and newest.resolve() == path.resolve() else self.checkpoints.attempt.id

    def resume_path(self) -> Path | None:
        mode = self.spec.checkpoint.resume
        if mode == "never":
            return None
        if mode == "auto":
            found = self.checkpoints.agreed_latest_valid()
            for folder, problems in self.checkpoints.skipped:
                self.reporter.emit("skipped_checkpoint", path=str(folder), problem=problems[0])
            return found
        path = self.spec.checkpoint.resume_folder(self.checkpoints.root)
        if not (path / "manifest.json").is_file():
            raise UserError(f"checkpoint.resume={mode}: {path} is not a committed checkpoint folder (no manifest.json)")
        return path

    def log_sample(self) -> None:
        """Every rank samples (MoE layers exchange tokens); rank 0 reports text, or writes the image grid to
        TensorBoard and samples/step_NNNNNN.png."""
        sample = self.objective.sample(seed=self.spec.schedule.seed)
        if sample is None:
            return
        if sample.text is not None:
            self.tensorboard.text(self.step, "sample", sample.text)
            self.reporter.emit("sample", step=self.step, text=sample.text)
            self.metrics["sample"] = sample.text
        if sample.grid is not None and self.world.is_main:
            path = self.run_dir / "samples" / f"step_{self.step:06d}.png"
            save_png(sample.grid, path)
            self.tensorboard.image(self.step, "samples", sample.grid)
            self.reporter.emit("sample_grid", step=self.step, path=str(path))
            self.metrics["sample_grid"] = str(path)


def placement_record(spec: JobSpec, placement: ExpertPlacement | None) -> dict[str, Any] | None:
    """What the manifest says of expert placement: serving and reshard read it."""
    if placement is None:
        return None
    return placement.record({block: spec.model.moe_layer_spec(block).num_experts for block in spec.model.moe_layers})


def code_version() -> str:
    """The installed distribution's version (package metadata: no import of the ember package from below it)."""
    return importlib.metadata.version("ember")


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
