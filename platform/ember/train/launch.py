"""Driver side of `ember run`: prepare data and the run folder, start or join Ray, run the TorchTrainer.

Ray owns the worker processes; ember decides which failures restart them (retry.py) and owns what a
checkpoint is.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from ember.data.build import ensure_shards, missing_local_shards
from ember.errors import InternalError, UserError, find_user_error
from ember.interop.huggingface import check_init_from
from ember.observe.progress import ProgressView
from ember.spec import JobSpec
from ember.spec.paths import is_under
from ember.train.loop import train_worker
from ember.train.preemption import NODE_DRAINING, REQUEST_FILE, SIGNALS, request_preemption
from ember.train.retry import Decision, Failure, decide, failure_kind


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def run_job(spec: JobSpec, verbose: bool = False, console: Console | None = None) -> RunResult:
    console = console or Console()
    if spec.cluster.address == "local":
        ensure_shards(spec.data)  # a remote cluster checks its own paths; locally, fail before Ray starts
        spec.check_local_inputs()
        check_init_from(spec.model)
    run_dir = prepare_run_dir(spec)
    with ray_session(spec, verbose) as embedded:
        if spec.cluster.address != "local":
            check_cluster_storage(spec, run_dir)
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        import ray

        # The progress queue lives on the driver's node: were it placed on a worker node, losing that node
        # would fail the whole job instead of letting Ray Train restart the workers.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        with forward_preemption_signals(run_dir), ProgressView(console) as view:
            metrics = fit_with_retries(lambda: build_trainer(spec, run_dir, queue, autoscaler=not embedded), queue,
                                       view, spec.cluster.max_failures, run_dir)
    if spec.logging.tensorboard:
        console.print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}", markup=False, soft_wrap=True)
    return RunResult(run_dir, metrics)


def prepare_run_dir(spec: JobSpec) -> Path:
    run_dir = spec.output_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    except OSError as exc:  # read-only, full, or a file in the way: the user's setting, not a crash
        raise UserError(f"run_dir: cannot write {run_dir} ({exc.strerror or exc}); choose a writable folder") from exc
    return run_dir


def check_cluster_storage(spec: JobSpec, run_dir: Path) -> None:
    """On a cluster of several hosts, run_dir must be one storage for all (probed: seconds, not a checkpoint
    commit waiting for files that never appear), and missing shards are built only where every host sees them."""
    one_host = len(set(node_ips().values())) == 1
    if not one_host:
        probe_shared_folder(run_dir)
    build = spec.data.build
    if build is not None and not one_host and not is_under(build.out, spec.cluster.shared_dirs) \
            and missing_local_shards(spec.data):
        raise UserError(
            f"data.build.out: {build.out}: shards are missing and would be built on the head host only; build them "
            "into a folder every host mounts (listed in cluster.shared_dirs), or serve them over http(s)://"
        )
    ensure_shards(spec.data)


def node_ips() -> dict[str, str]:
    """Alive Ray nodes: node id -> IP."""
    import ray

    return {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}


def probe_shared_folder(folder: Path) -> None:
    """Every node writes a file into `folder`, then every node lists them: each must see all."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import ray

    nodes = node_ips()
    probe = str(folder / ".storage-probe" / os.urandom(4).hex())
    write, read = ray.remote(num_cpus=0)(write_probe), ray.remote(num_cpus=0)(read_probes)
    on = {node: {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)} for node in nodes}
    wrote = ray.get([write.options(**on[node]).remote(probe, node) for node in nodes], timeout=120)
    seen = ray.get([read.options(**on[node]).remote(probe) for node in nodes], timeout=120)
    problems = [f"{nodes[node]}: {error}" for node, error in zip(nodes, wrote, strict=True) if error]
    for node, files in zip(nodes, seen, strict=True):
        unseen = [nodes[other] for other in nodes if other not in files]
        if unseen:
            problems.append(f"{nodes[node]} does not see the files written by {', '.join(unseen)}")
    if problems:
        raise UserError(
            f"run_dir {folder} is not the same storage on every host ({'; '.join(problems)}); put run_dir on a "
            "folder every host mounts at the same path (NFS, Lustre) and list it in cluster.shared_dirs"
        )
    shutil.rmtree(probe, ignore_errors=True)


def write_probe(probe: str, node: str) -> str | None:
    try:
        Path(probe).mkdir(parents=True, exist_ok=True)
        Path(probe, node).write_text(node)
    except OSError as err:
        return f"cannot write there ({err})"
    return None


def read_probes(probe: str) -> list[str]:
    return sorted(path.name for path in Path(probe).iterdir()) if Path(probe).is_dir() else []


@contextlib.contextmanager
def ray_session(spec: JobSpec, verbose: bool) -> Iterator[bool]:
    """Embedded local Ray (started and stopped here), or join the cluster at cluster.address. Yields whether the
    Ray is the embedded one, which has a fixed set of CPUs and no autoscaler."""
    import ray

    if ray.is_initialized():  # a notebook or test already holds a Ray session: use it
        yield False
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
        yield cluster.address == "local"
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


# Ray Train's settings ember chooses; Ray Train passes them from this driver's environment to its controller, and a
# user's own setting wins. The poll: how often the controller polls the worker group (Ray's default 2 s): the run's
# end, a worker's death and each report wait for the next poll. The preemption watcher: an actor of its own per
# worker group that polls the GCS for draining nodes and only logs them, while ember's loop already watches its
# nodes' drains and checkpoints (train/preemption.py); off, it is one process less to start (ray_trainer.py).
RAY_TRAIN_SETTINGS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def build_trainer(spec: JobSpec, run_dir: Path, queue: Any, autoscaler: bool = True):
    """autoscaler: False where the Ray has none to ask for the workers' resources (the embedded one)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from ember.train.ray_trainer import EmberTorchTrainer

    for name, value in RAY_TRAIN_SETTINGS.items():
        os.environ.setdefault(name, value)

    cluster = spec.cluster
    use_gpu = cluster.device == "cuda" or (cluster.device == "auto" and _cluster_has_gpus())
    resources = {"CPU": cluster.cpus_per_worker, **cluster.resources_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return EmberTorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir), "queue": queue,
                           "report_to_ray": True},
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name="ray-train",
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=0),  # ember's own attempts loop decides (retry.py)
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        autoscaler=autoscaler,
    )


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def fit_with_retries(make_trainer: Callable[[], Any], queue: Any, view: ProgressView, max_failures: int,
                     run_dir: Path) -> dict:
    """One fit per attempt, each of a fresh worker group that resumes from the newest committed checkpoint;
    retry.decide says whether a failed attempt is tried again (never for a user's mistake). An attempt stopped
    by a draining node is not a failure: the next one resumes on the nodes left (or added)."""
    history: list[Failure] = []
    while True:
        attempt = fit_with_progress(make_trainer(), queue, view)
        if attempt.error is None and drained_only(attempt.metrics, run_dir):
            view.note(f"a node of the job is draining (preemption): checkpointed at step {attempt.metrics['step']}, "
                      "resuming on the nodes left")
            continue
        if attempt.error is None:
            return attempt.metrics
        failure = Failure(failure_kind(attempt.error), attempt.last_step)
        if decide(failure, history, max_failures) is not Decision.RETRY:
            raise_training_error(attempt.error)
        history.append(failure)
        view.note(f"attempt {len(history)} failed at step {failure.step} ({failure.kind}); restarting the workers "
                  f"({len(history)} of {'unlimited' if max_failures == -1 else max_failures} restarts)")


def drained_only(metrics: dict[str, Any], run_dir: Path) -> bool:
    """The workers stopped for a draining node, and this driver was not asked to stop itself meanwhile."""
    return metrics.get("preempted_by") == NODE_DRAINING and not (run_dir / REQUEST_FILE).exists()


@dataclass
class Attempt:
    metrics: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    last_step: int = 0


def fit_with_progress(trainer: Any, queue: Any, view: ProgressView) -> Attempt:
    """Run trainer.fit() on a thread and render the workers' events until it returns."""
    from ray.util.queue import Empty

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the attempts loop on the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ember-fit", daemon=True)
    thread.start()
    attempt = Attempt()
    while thread.is_alive() or not queue.empty():
        try:
            event = queue.get(timeout=0.5)
        except Empty:
            continue
        if event["kind"] == "done":
            attempt.metrics = event["metrics"]
        attempt.last_step = event.get("step", attempt.last_step)
        view.handle(event)
    thread.join()
    attempt.error = outcome.get("error")
    return attempt


def raise_training_error(exc: BaseException) -> None:
    user_error = find_user_error(exc)
    if user_error is not None:
        raise UserError(user_error.message) from None
    raise InternalError(f"training failed: {exc}") from exc
