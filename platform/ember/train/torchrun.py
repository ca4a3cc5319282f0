"""Run a job under torchrun instead of Ray: `torchrun --nproc-per-node N -m ember.train.torchrun SPEC`.

The same worker code as `ember run`; Ray adds scheduling, restarts and the cluster, torchrun only
processes. Used as the reference in bench/launch.py and where a cluster has no Ray.
"""

from __future__ import annotations

import argparse
import os
import sys

from ember.data.build import missing_local_shards
from ember.errors import RESUMABLE_EXIT_CODE, UserError
from ember.spec import JobSpec
from ember.train.launch import prepare_run_dir
from ember.train.loop import train_worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ember.train.torchrun")
    parser.add_argument("spec")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        spec = JobSpec.load(args.spec, args.overrides)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size != spec.cluster.num_workers:
            spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"num_workers": world_size})})
        missing = missing_local_shards(spec.data)
        if missing:  # no rank builds here: ranks would race; `ember run` or `ember data build` builds
            raise UserError(
                f"missing shards: {', '.join(missing[:5])}; build them first (`ember data build text|images ...`, "
                "or one `ember run` of the spec, which builds what data.build describes)"
            )
        if int(os.environ.get("RANK", "0")) == 0:
            prepare_run_dir(spec)
        metrics = train_worker({"spec": spec.model_dump(mode="json"), "run_dir": str(spec.output_dir)})
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if metrics.get("preempted"):
        sys.exit(RESUMABLE_EXIT_CODE)


if __name__ == "__main__":
    main()
