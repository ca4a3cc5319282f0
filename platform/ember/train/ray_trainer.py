"""Ray Train's TorchTrainer without the parts ember does not use, each a process started for every run.

Measured on the quickstart (bench/startup.py, bench/RESULTS.md "Start-up"): beside its controller and the
training workers, Ray Train 2.60 starts for every run
- a DatasetManager actor, datasets or not: ember streams its own shards (ember.data), so with no Ray Datasets
  given the DatasetsCallback is left out; the workers then get no dataset shard provider, which only
  `ray.train.get_dataset_shard` reads;
- Ray Data's autoscaling coordinator, to which the controller sends its resource request and waits for the
  answer before it starts the workers: that request is for an autoscaler, and ember's embedded Ray has none
  (a fixed set of CPUs on this machine), so there the request is not sent; on a cluster it is, as Ray does;
- a preemption watcher, turned off in launch.py: ember's loop watches its nodes' drains itself.
Each is a fresh Python process importing ray.train, ray.data and pandas (about 1.6 CPU s each) while the
training workers import torch on the same cores. These hooks are Ray Train's internals (Train v2, pinned in
constraints.txt); where a Ray lacks them, its own defaults stand. Imported only where a trainer is built.
"""

from __future__ import annotations

from typing import Any

from ray.train.torch import TorchTrainer

try:
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
except ImportError:  # a Ray without Train v2's callbacks and policies: its own defaults stand
    DatasetsCallback = FixedScalingPolicy = None

if FixedScalingPolicy is not None:
    class NoAutoscalerPolicy(FixedScalingPolicy):
        """A fixed worker group on a Ray without an autoscaler: no resource requests, so no coordinator."""

        def after_controller_start(self, train_run_context) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass


class EmberTorchTrainer(TorchTrainer):
    def __init__(self, *args: Any, autoscaler: bool = True, **kwargs: Any) -> None:
        """autoscaler: whether the cluster may have one (False for the embedded local Ray)."""
        super().__init__(*args, **kwargs)
        self.autoscaler = autoscaler

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if self.datasets or DatasetsCallback is None:
            return callbacks
        return [callback for callback in callbacks if not isinstance(callback, DatasetsCallback)]

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any):
        policy = controller_init_kwargs.get("scaling_policy")
        if not self.autoscaler and FixedScalingPolicy is not None and type(policy) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = NoAutoscalerPolicy(policy.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
