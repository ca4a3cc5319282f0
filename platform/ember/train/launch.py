"""Driver side of `ember run`: prepare data and the run folder, start or join Ray, run the TorchTrainer.

Ray owns the worker processes and their restarts (FailureConfig); ember owns what a checkpoint is.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from ember.data.build import ensure_shards
from ember.errors import InternalError, UserError, find_user_error
from ember.interop.huggingface import check_init_from
from ember.observe.progress import ProgressView
from ember.spec import JobSpec
from ember.train.loop import train_worker
from ember.train.preemption import SIGNALS, request_preemption


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def run_job(spec: JobSpec, verbose: bool = False, console: Console | None = None) -> RunResult:
    console = console or Console()
    if spec.cluster.address == "local":
        ensure_shards(spec.data)  # a remote cluster checks its own paths; locally, fail before Ray starts
        check_init_from(spec.model)
    run_dir = prepare_run_dir(spec)
    with ray_session(spec, verbose):
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        import ray

        # The progress queue lives on the driver's node: were it placed on a worker node, losing that node
        # would fail the whole job instead of letting Ray Train restart the workers.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        trainer = build_trainer(spec, run_dir, queue)
        with forward_preemption_signals(run_dir):
            metrics = fit_with_progress(trainer, queue, ProgressView(console))
    if spec.logging.tensorboard:
        console.print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}", markup=False, soft_wrap=True)
    return RunResult(run_dir, metrics)


def prepare_run_dir(spec: JobSpec) -> Path:
    run_dir = spec.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    return run_dir


@contextlib.contextmanager
def ray_session(spec: JobSpec, verbose: bool) -> Iterator[None]:
    """Embedded local Ray (started and stopped here), or join the cluster at cluster.address."""
    import ray

    if ray.is_initialized():  # a notebook or test already holds a Ray session: use it
        yield
        return
    cluster = spec.cluster
    if cluster.address == "local":
        needed = math.ceil(cluster.num_workers * cluster.cpus_per_worker)
        ray.init(
            num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False, log_to_driver=verbose, namespace="ember"
        )
    else:
        ray.init(address=cluster.address, log_to_driver=verbose, namespace="ember")
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def forward_preemption_signals(run_dir: Path) -> Iterator[None]:
    """SIGTERM/SIGUSR1 to the driver become a preemption request the workers act on at a step boundary.
    So does a first Ctrl-C (SIGINT): the run checkpoints and stops with the resumable exit code, instead of
    losing the steps since the last checkpoint; a second Ctrl-C aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    watched = (*SIGNALS, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in watched}
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, _frame: request_preemption(run_dir, signal.Signals(signum).name))

    def on_interrupt(_signum: int, _frame) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C raises KeyboardInterrupt
        request_preemption(run_dir, "SIGINT")
        print("\nCtrl-C: checkpointing at the next step boundary, then stopping (`ember run` again resumes); "
              "Ctrl-C again aborts now", file=sys.stderr, flush=True)

    if previous[signal.SIGINT] is not signal.SIG_IGN:  # a background job started with SIGINT ignored keeps it so
        signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_trainer(spec: JobSpec, run_dir: Path, queue: Any):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cluster = spec.cluster
    use_gpu = cluster.device == "cuda" or (cluster.device == "auto" and _cluster_has_gpus())
    resources = {"CPU": cluster.cpus_per_worker, **cluster.resources_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir), "queue": queue},
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name="ray-train",
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def fit_with_progress(trainer: Any, queue: Any, view: ProgressView) -> dict[str, Any]:
    """Run trainer.fit() on a thread and render the workers' events until it returns."""
    from ray.util.queue import Empty

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised on the main thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ember-fit", daemon=True)
    thread.start()
    metrics: dict[str, Any] = {}
    with view:
        while thread.is_alive() or not queue.empty():
            try:
                event = queue.get(timeout=0.5)
            except Empty:
                continue
            if event["kind"] == "done":
                metrics = event["metrics"]
            view.handle(event)
    thread.join()
    if "error" in outcome:
        raise_training_error(outcome["error"])
    return metrics


def raise_training_error(exc: BaseException) -> None:
    user_error = find_user_error(exc)
    if user_error is not None:
        raise UserError(user_error.message) from None
    raise InternalError(f"training failed: {exc}") from exc
