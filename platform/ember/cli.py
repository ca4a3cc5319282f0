"""ember's command line. Thin: parse, call one function per command, map errors to exit codes.

Exit codes: 0 ok; 2 a user mistake (one message naming the field or file); 1 an internal failure.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from ember.errors import RESUMABLE_EXIT_CODE, InternalError, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train and serve generative models on Ray.",
)
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect WebDataset shards.")
ckpt_app = typer.Typer(no_args_is_help=True, help="List, verify and export checkpoints.")
app.add_typer(data_app, name="data")
app.add_typer(ckpt_app, name="ckpt")

console = Console()
errors = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="Job spec YAML.", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set engine.zero_stage=3.")]


def _load(spec: Path, overrides: list[str] | None):
    from ember.spec import JobSpec

    return JobSpec.load(spec, overrides or [])


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a job spec; exit 2 with the field at fault if it is invalid."""
    job = _load(spec, set_)
    console.print(f"{spec}: valid ({job.model.family}, engine {job.engine.kind}, {job.cluster.num_workers} workers)")


@app.command()
def schema() -> None:
    """Print the job spec's JSON Schema."""
    from ember.spec import JobSpec

    print(json.dumps(JobSpec.model_json_schema(), indent=2))


@app.command()
def show(spec: SpecArg, set_: SetOpt = None) -> None:
    """Print the resolved spec (defaults filled in) and the engine config it generates."""
    job = _load(spec, set_)
    print(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False), end="")
    print(
        f"# derived: grad_accumulation={job.grad_accumulation} global_batch={job.global_batch} run_dir={job.output_dir}"
    )
    if job.engine.kind == "deepspeed":
        from ember.engines.deepspeed import deepspeed_config

        print("# DeepSpeed config:")
        print(json.dumps(deepspeed_config(job), indent=2))


@app.command()
def run(
    spec: SpecArg,
    set_: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the workers' own logs.")] = False,
) -> None:
    """Train: build missing shards, start or join Ray, run the job, checkpoint and log."""
    _train(_load(spec, set_), verbose, f"ember run {spec}")


def _train(job, verbose: bool, label: str) -> None:
    from ember.train.launch import run_job

    result = run_job(job, verbose=verbose, console=console)
    final = {k: v for k, v in result.metrics.items() if k != "sample"}
    if final.get("preempted"):
        console.print(f"preempted at step {final['step']}; `{label}` resumes", markup=False, soft_wrap=True)
        raise typer.Exit(RESUMABLE_EXIT_CODE)
    console.print(f"done: {result.run_dir}  {json.dumps(final)}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (runs/<name>).")],
    world_size: Annotated[int | None, typer.Option("--world-size", min=1, help="Workers for the new run.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Only print what would happen.")] = False,
    set_: SetOpt = None,
) -> None:
    """Continue a run from its newest valid checkpoint, optionally on another number of workers."""
    from ember.train.resume import plan_resume

    plan = plan_resume(run_dir, world_size, set_)
    console.print(plan.describe(), markup=False, highlight=False, soft_wrap=True)
    if not check:
        _train(plan.spec, verbose=False, label=str(run_dir))


@data_app.command("build")
def data_build(
    kind: Annotated[str, typer.Argument(help="What to build: text.")],
    out: Annotated[Path, typer.Option(help="Output folder for the shards.")],
    source: Annotated[str, typer.Option(help="Corpus: stdlib (Python's own source).")] = "stdlib",
    train_shards: Annotated[int, typer.Option(min=1, help="Number of training shards.")] = 8,
    val_fraction: Annotated[float, typer.Option(min=0.001, max=0.5, help="Held-out fraction.")] = 0.05,
) -> None:
    """Write WebDataset tar shards (train/val) and a shards.json index."""
    from ember.data.build import build_text_shards

    if kind != "text":
        raise UserError(f"ember data build {kind}: unknown kind; use `text`")
    if source != "stdlib":
        raise UserError(f"--source {source}: unknown text source; use stdlib")
    index = build_text_shards(out, source=source, train_shards=train_shards, val_fraction=val_fraction)
    samples = sum(s["samples"] for s in index["shards"])
    console.print(f"wrote {len(index['shards'])} shards ({samples} samples) to {out}")


@ckpt_app.command("list")
def ckpt_list(run_dir: Annotated[Path, typer.Argument(help="Run folder (runs/<name>).")]) -> None:
    """List committed checkpoints, newest first, with whether they verify."""
    from ember.checkpoint.manager import CheckpointManager
    from ember.checkpoint.manifest import verify_manifest

    root = run_dir / "checkpoints"
    folders = CheckpointManager(root, world=None).committed()
    if not folders:
        raise UserError(f"{run_dir}: no committed checkpoints under {root}")
    for folder in folders:
        problems = verify_manifest(folder)
        console.print(f"{folder.name}  {'ok' if not problems else 'BAD: ' + problems[0]}", markup=False)


@ckpt_app.command("verify")
def ckpt_verify(run_dir: Annotated[Path, typer.Argument(help="Run folder (runs/<name>).")]) -> None:
    """Verify every committed checkpoint (sizes and sha256); exit 2 if the newest is bad."""
    from ember.checkpoint.manager import CheckpointManager

    manager = CheckpointManager(run_dir / "checkpoints", world=None)
    if not manager.committed():
        raise UserError(f"{run_dir}: no committed checkpoints under {run_dir / 'checkpoints'}")
    found = manager.latest_valid(checksums=True)
    for folder, problems in manager.skipped:
        errors.print(f"{folder.name}: BAD: {'; '.join(problems)}", markup=False, soft_wrap=True)
    if manager.skipped and manager.skipped[0][0] == manager.committed()[0]:
        newest, problems = manager.skipped[0]
        fallback = f"; a resume would use {found.name}" if found else "; no valid checkpoint is left"
        raise UserError(f"newest checkpoint {newest} does not verify: {problems[0]}{fallback}")
    console.print(f"{found.name}: ok (newest, verified)", markup=False)


@ckpt_app.command("export")
def ckpt_export(
    path: Annotated[Path, typer.Argument(help="Run folder or checkpoint folder.")],
    out: Annotated[Path, typer.Option(help="Output .safetensors file.")],
) -> None:
    """Write the full model weights (gathered from ZeRO shards and expert files) as safetensors."""
    from ember.checkpoint.export import export_safetensors

    source = export_safetensors(path, out)
    console.print(f"exported {source} -> {out}", markup=False)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        app(args=argv, prog_name="ember")  # click itself reports a wrong flag or argument with exit 2
    except UserError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except InternalError as exc:
        errors.print(f"internal error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
