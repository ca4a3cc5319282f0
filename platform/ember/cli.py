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
    rich_markup_mode=None,  # help texts are plain: "[text 0.05, images 0.165]" is text, not a markup tag
    help="Train and serve generative models on Ray.",
)
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect WebDataset shards.")
ckpt_app = typer.Typer(no_args_is_help=True, help="List, verify and export checkpoints.")
app.add_typer(data_app, name="data")
app.add_typer(ckpt_app, name="ckpt")

console = Console()
errors = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="Job spec YAML.", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="FIELD=VALUE",
    help="Override a field; repeatable: --set engine.zero_stage=3 --set schedule.steps=100.",
)]


def _load(spec: Path, overrides: list[str] | None):
    from ember.spec import JobSpec

    return JobSpec.load(spec, overrides or [])


def _print_version(requested: bool) -> None:
    if requested:
        from importlib.metadata import version

        console.print(f"ember {version('ember')}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    _version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print ember's version and exit."
    )] = False,
) -> None:
    """Train and serve generative models on Ray."""


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a job spec; exit 2 with the field at fault if it is invalid."""
    job = _load(spec, set_)
    job.check_local_inputs()
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
    job = _load(spec, set_)
    if job.cluster.address == "local":
        _note_running_cluster()
    _train(job, verbose, f"ember run {spec}")


def _note_running_cluster() -> None:
    """An embedded Ray beside a running `ember up` head: two Rays on the same cores, and a slower start."""
    from ember.cluster.local import running_heads

    heads = running_heads(STATE_DIR)
    if heads:
        names = ", ".join(repr(head.name) for head in heads)
        errors.print(f"note: the `ember up` cluster {names} runs on this machine; this run starts an embedded Ray "
                     "beside it on the same cores. `--set cluster.address=auto` runs on the cluster instead and "
                     "starts sooner.", markup=False, highlight=False, soft_wrap=True)


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
    allow_spec_change: Annotated[list[str] | None, typer.Option(
        "--allow-spec-change", help="A spec field (e.g. model.n_heads) the resume may change though it changes "
        "what the model computes. Repeatable.",
    )] = None,
) -> None:
    """Continue a run from its newest valid checkpoint, optionally on another number of workers. A spec change
    that changes what the model computes (shape, MoE routing, data sources) is refused (exit 2) unless allowed."""
    from ember.train.resume import plan_resume

    allowed = [f"checkpoint.allow_spec_change={json.dumps(allow_spec_change)}"] if allow_spec_change else []
    plan = plan_resume(run_dir, world_size, [*(set_ or []), *allowed])
    console.print(plan.describe(), markup=False, highlight=False, soft_wrap=True)
    if plan.refused:
        raise UserError(f"{run_dir}: resume refused: {', '.join(plan.refused)} changed (see above)")
    if not check:
        _train(plan.spec, verbose=False, label=str(run_dir))


@data_app.command("build")
def data_build(
    kind: Annotated[str, typer.Argument(help="What to build: text or images.")],
    out: Annotated[Path, typer.Option(help="Output folder for the shards.")],
    source: Annotated[
        str, typer.Option(help="text: stdlib (Python's own source); images: digits or sample-images.")
    ] = "stdlib",
    train_shards: Annotated[int, typer.Option(min=1, help="text: number of training shards.")] = 8,
    shard_size: Annotated[int, typer.Option(min=1, help="images: samples per training shard.")] = 256,
    image_size: Annotated[int, typer.Option(help="images: side in pixels (8, 16 or 32).")] = 8,
    val_fraction: Annotated[
        float | None, typer.Option(min=0.001, max=0.5, help="Held-out fraction [text 0.05, images 0.165].")
    ] = None,
    tokenizer: Annotated[
        str, typer.Option(help="text: bytes, or bpe: also train a byte-level BPE on the train split (tokenizer.json).")
    ] = "bytes",
    vocab_size: Annotated[int, typer.Option(min=257, help="text, --tokenizer bpe: vocabulary size.")] = 4096,
) -> None:
    """Write WebDataset tar shards (train/val) and a shards.json index."""
    if kind == "text":
        from ember.data.build import build_text_shards

        if source != "stdlib":
            raise UserError(f"--source {source}: unknown text source; use stdlib")
        index = build_text_shards(
            out, source=source, train_shards=train_shards, val_fraction=val_fraction or 0.05,
            tokenizer=tokenizer, vocab_size=vocab_size,
        )
    elif kind == "images":
        from ember.data.build_images import IMAGE_SOURCES, build_image_shards

        if source not in IMAGE_SOURCES:
            raise UserError(f"--source {source}: unknown kind of image source; use {' or '.join(IMAGE_SOURCES)}")
        index = build_image_shards(out, source, shard_size, image_size, val_fraction or 0.165)
    else:
        raise UserError(f"ember data build {kind}: unknown kind; use `text` or `images`")
    samples = sum(s["samples"] for s in index["shards"])
    console.print(f"wrote {len(index['shards'])} shards ({samples} samples) to {out}", markup=False)


@data_app.command("inspect")
def data_inspect(
    folder: Annotated[Path, typer.Argument(help="Shard folder (with shards.json).")],
    grid: Annotated[Path | None, typer.Option(help="Write a PNG grid of the first images here.")] = None,
    keys: Annotated[int, typer.Option(min=0, help="How many first samples to list.")] = 5,
) -> None:
    """Print a shard folder's counts, sizes and first sample keys; optionally write an image grid."""
    from ember.data.inspect import describe, write_grid

    console.print("\n".join(describe(folder, keys)), markup=False, highlight=False, soft_wrap=True)
    if grid is not None:
        count = write_grid(folder, grid)
        console.print(f"wrote a grid of {count} images to {grid}", markup=False)


def _numbers(text: str | None, kind: type, option: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} {text}: give comma-separated {kind.__name__}s, e.g. {option} 1,2") from None


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (runs/<name>) of a diffusion, GAN or image-GPT job.")],
    n: Annotated[int, typer.Option("--n", min=10, help="Samples per seed.")] = 1000,
    seeds: Annotated[str | None, typer.Option(help="Sampling seeds, comma-separated [0,1,2].")] = None,
    guidance: Annotated[str | None, typer.Option(help="Diffusion: guidance scales, comma-separated.")] = None,
    out: Annotated[Path | None, typer.Option(help="Report file [RUN_DIR/eval.json].")] = None,
    inception_weights: Annotated[Path | None, typer.Option(
        help="A local file of FID's Inception-v3 weights (torch-fidelity's or pytorch-fid's): adds real FID."
    )] = None,
) -> None:
    """Score samples: Frechet distance to held-out digits in a digits classifier's features, and class accuracy;
    real FID too with --inception-weights."""
    from ember.evaluate.report import evaluate_run, summary

    if not (run_dir / "checkpoints").is_dir() and not (run_dir / "manifest.json").is_file():
        raise UserError(f"{run_dir}: not a run folder (no checkpoints/); pass runs/<name>")
    report = evaluate_run(
        run_dir, EMBER_HOME / "cache", n, _numbers(seeds, int, "--seeds"), _numbers(guidance, float, "--guidance"), out,
        inception_weights,
    )
    console.print("\n".join(summary(report)), markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {out or run_dir / 'eval.json'}", markup=False)


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
    """Verify every committed checkpoint (sizes and sha256); exit 2 if any is bad."""
    from ember.checkpoint.manager import CheckpointManager
    from ember.checkpoint.manifest import verify_manifest

    folders = CheckpointManager(run_dir / "checkpoints", world=None).committed()
    if not folders:
        raise UserError(f"{run_dir}: no committed checkpoints under {run_dir / 'checkpoints'}")
    bad = {}
    for folder in folders:  # newest commit first
        problems = verify_manifest(folder, checksums=True)
        if problems:
            bad[folder] = problems
            errors.print(f"{folder.name}: BAD: {'; '.join(problems)}", markup=False, soft_wrap=True)
        else:
            console.print(f"{folder.name}: ok", markup=False)
    if bad:
        good = [folder for folder in folders if folder not in bad]
        fallback = f"a resume would use {good[0].name}" if good else "no valid checkpoint is left"
        raise UserError(f"{len(bad)} of {len(folders)} checkpoints do not verify "
                        f"({', '.join(folder.name for folder in bad)}); {fallback}")


@ckpt_app.command("export")
def ckpt_export(
    path: Annotated[Path, typer.Argument(help="Run folder or checkpoint folder.")],
    out: Annotated[Path, typer.Option(help="Output: a .safetensors file (ember), a folder (hf).")],
    format: Annotated[
        str, typer.Option("--format", help="ember: one safetensors file, spec in its metadata. hf: a Hugging Face "
                          "folder (config.json, model.safetensors, tokenizer) for transformers, vLLM, SGLang.")
    ] = "ember",
) -> None:
    """Write the full model weights (gathered from ZeRO shards and expert files) as safetensors."""
    from ember.checkpoint.export import export_huggingface, export_safetensors
    from ember.engines.weights import full_state_dict

    if format not in ("ember", "hf"):
        raise UserError(f"--format {format}: choose ember or hf")
    if format == "hf":
        source, architecture = export_huggingface(path, out, full_state_dict)
        console.print(f"exported {source} -> {out} ({architecture})", markup=False)
        return
    source = export_safetensors(path, out, full_state_dict)
    console.print(f"exported {source} -> {out}", markup=False)


@app.command("moe-stats")
def moe_stats(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (runs/<name>).")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of the table.")] = False,
) -> None:
    """Expert-load imbalance per MoE layer at the latest logged step (from the run's TensorBoard logs)."""
    from ember.observe.moe_stats import format_table, moe_stats_table

    step, rows = moe_stats_table(run_dir)
    if as_json:
        console.print_json(json.dumps({"step": step, "layers": rows}))
        return
    console.print(f"{run_dir}: MoE routing at step {step}; load = an expert's token share x experts (1.00 uniform)",
                  markup=False, highlight=False, soft_wrap=True)
    console.print(format_table(rows), markup=False, highlight=False, soft_wrap=True)


CheckpointArg = Annotated[Path, typer.Argument(help="Run folder (newest valid checkpoint) or checkpoint folder.")]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 is greedy.")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", min=1, help="Sample among the k most likely tokens.")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")]
DtypeOpt = Annotated[str, typer.Option(
    help="Weights and KV cache: auto (fp32 on CPU; on a GPU the checkpoint's 16-bit precision, else bf16), "
         "fp32, bf16 or fp16."
)]


@app.command()
def generate(
    path: CheckpointArg,
    prompt: Annotated[str, typer.Option(help="Text to continue (byte-level tokens).")],
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 64,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always the most likely token (temperature 0).")] = False,
    temperature: TemperatureOpt = 1.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop once the text contains this (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print tokens, text and finish reason as JSON.")] = False,
    dtype: DtypeOpt = "auto",
) -> None:
    """Generate text from a GPT checkpoint in this process (KV cache; the reference for `ember serve`)."""
    from ember.generation.sampling import SamplingParams
    from ember.serve.generate import generate as run_generate

    params = SamplingParams(0.0 if greedy else temperature, top_k, top_p, seed)
    result = run_generate(path, prompt, max_tokens, params, stop, dtype)
    if as_json:
        print(json.dumps({"tokens": result.tokens, "text": result.text, "finish_reason": result.finish_reason}))
    else:
        print(prompt + result.text)


@app.command("serve")
def serve_(
    path: CheckpointArg,
    ep: Annotated[int, typer.Option("--ep", min=1, help="Expert-parallel ranks per replica.")] = 1,
    replicas: Annotated[int, typer.Option(min=1, help="Replicas, each with its own EP ranks.")] = 1,
    host: Annotated[str, typer.Option(
        help="HTTP bind address (on the Ray head); anything but 127.0.0.1 needs --token-file."
    )] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    token_file: Annotated[
        Path | None, typer.Option(help="File holding the bearer token every request must send.")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Join this Ray cluster (HOST:PORT), not an embedded one.")] = None,
    spread_ranks: Annotated[bool, typer.Option(
        "--spread-ranks", help="One EP rank per Ray node (each host holds only its experts); needs --ep nodes."
    )] = False,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together per replica.")] = 64,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Cap on max_tokens (default: context).")] = None,
    cpus_per_rank: Annotated[float, typer.Option(min=0.01, help="Ray CPUs reserved per EP rank.")] = 0.5,
    device: Annotated[str, typer.Option(help="auto (GPUs when the cluster has them), cpu or cuda.")] = "auto",
    served_model_name: Annotated[
        str | None, typer.Option(help="The model name clients send and get back (default: ember).")
    ] = None,
    chat_template: Annotated[
        Path | None, typer.Option(help="Jinja2 chat template (as Hugging Face tokenizers use): /v1/chat/completions.")
    ] = None,
    kv_cache_mb: Annotated[
        float | None, typer.Option(min=0.001, help="KV-cache budget per rank in MiB; admission waits for room in it "
                                      "(default: half the memory free after loading, split among a host's ranks).")
    ] = None,
    max_waiting: Annotated[
        int | None, typer.Option(min=1, help="Sequences that may wait for a slot; past it, 503 (default 4 x batch).")
    ] = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """Serve a checkpoint over HTTP, OpenAI-compatible: /v1/completions, /v1/chat/completions (EP ranks, continuous
    batching), /v1/images, /v1/models, /health, /metrics."""
    from ember.generation.precision import CHOICES
    from ember.serve.app import ServeOptions, run_server
    from ember.serve.chat import ChatTemplate

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device}: use auto, cpu or cuda")
    if dtype not in CHOICES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(CHOICES)}")
    token = _read_token(token_file) if token_file is not None else None
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        raise UserError(
            f"--host {host}: serving beyond this machine needs --token-file F (a bearer token every request must "
            "send; e.g. `openssl rand -hex 24 > F`); Ray's own token does not protect the HTTP port"
        )
    template = ChatTemplate.read(chat_template).source if chat_template is not None else None
    options = ServeOptions(str(path), ep, replicas, host, port, token, max_batch=max_batch, max_waiting=max_waiting,
                           kv_cache_mb=kv_cache_mb,
                           max_tokens_limit=max_tokens, rank_cpus=cpus_per_rank, served_model_name=served_model_name,
                           chat_template=template, spread_ranks=spread_ranks, dtype=dtype)  # fmt: skip
    run_server(options, address, device, lambda line: console.print(line, markup=False, soft_wrap=True))


def _read_token(path: Path) -> str:
    from ember.cluster.local import read_token_file

    return read_token_file(path)


EMBER_HOME = Path(os.environ.get("EMBER_HOME", Path.home() / ".ember"))
STATE_DIR = EMBER_HOME / "clusters"
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray dashboard, e.g. http://127.0.0.1:8265.")]


@app.command()
def up(
    port: Annotated[int, typer.Option(help="Dashboard / Jobs API port.")] = 8265,
    gcs_port: Annotated[int, typer.Option(help="GCS port (what workers join).")] = 6379,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs this node offers (default: all).")] = None,
    join: Annotated[str | None, typer.Option(help="Join the head at HOST:GCS_PORT as a worker node.")] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="With --join: a copy of the head's ~/.ray/auth_token.")
    ] = None,
    ip: Annotated[str | None, typer.Option(help="This node's address (head default 127.0.0.1; a worker's: the "
                                                 "one that reaches the head).")] = None,
    name: Annotated[str, typer.Option(help="Name of this ember-started cluster node.")] = "local",
    block: Annotated[bool, typer.Option("--block", help="Stay in the foreground (Slurm, KubeRay, systemd): "
                                        "SIGTERM then drains this node, so training checkpoints first.")] = False,
    grace: Annotated[int, typer.Option("--grace", min=0, help="With --block: seconds a SIGTERM leaves running "
                                       "jobs to checkpoint before this node's Ray is stopped.")] = 60,
) -> None:
    """Start a Ray head (or a worker with --join), token auth on; the head prints how another host joins."""
    from ember.cluster.local import UpOptions, join_instructions
    from ember.cluster.local import up as start

    if token_file is not None and join is None:
        raise UserError("--token-file: only a worker joining a head (--join HOST:PORT) takes the head's token")
    cluster = start(STATE_DIR, UpOptions(name, port, gcs_port, num_cpus, join, ip, token_file))
    where = f"dashboard / jobs: {cluster.dashboard}" if cluster.dashboard else f"joined {cluster.address}"
    console.print(f"{cluster.role} up: {where}; GCS {cluster.address}; token: {cluster.token_path}", markup=False,
                  soft_wrap=True)
    if cluster.role == "head":
        console.print(join_instructions(cluster), markup=False, soft_wrap=True)
    if block:
        _block(cluster, name, grace)


def _block(cluster, name: str, grace: int) -> None:
    from ember.cluster.drain import supervise

    console.print(f"blocking; SIGTERM drains this node (grace {grace} s), then stops its Ray", markup=False)
    code = supervise(cluster, grace, lambda line: console.print(line, markup=False, soft_wrap=True))
    (STATE_DIR / f"{name}.json").unlink(missing_ok=True)  # its Ray is gone: `ember up` may start it again
    raise typer.Exit(code)


@app.command()
def down(name: Annotated[str, typer.Option(help="The `ember up --name` to stop.")] = "local") -> None:
    """Stop only the Ray processes `ember up` started (never other Ray clusters on this machine)."""
    from ember.cluster.local import down as stop

    console.print(f"stopped {stop(STATE_DIR, name)} processes of cluster {name!r}", markup=False)


SharedOpt = Annotated[
    list[str] | None,
    typer.Option("--shared", help="A folder every cluster host mounts at this same path (cluster.shared_dirs)."),
]


@app.command()
def submit(spec: SpecArg, set_: SetOpt = None, address: AddressOpt = None, shared: SharedOpt = None) -> None:
    """Validate a job spec locally, then submit it to a Ray cluster's Jobs API; prints the job id."""
    from ember.cluster.jobs import submit as send
    from ember.cluster.local import recorded_dashboard

    job_id, target = send(spec, set_ or [], address, recorded_dashboard(STATE_DIR), shared or [])
    console.print(f"submitted {job_id} to {target}", markup=False)


def _client(address: str | None):
    from ember.cluster.jobs import connect, resolve_address
    from ember.cluster.local import recorded_dashboard

    return connect(resolve_address(address, None, recorded_dashboard(STATE_DIR)))


@app.command()
def status(job: Annotated[str, typer.Argument(help="Job id from `ember submit`.")], address: AddressOpt = None) -> None:
    """A submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from ember.cluster.jobs import status as job_status

    console.print(job_status(_client(address), job), markup=False)


@app.command()
def logs(
    job: Annotated[str, typer.Argument(help="Job id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False,
    address: AddressOpt = None,
) -> None:
    """A submitted job's driver output."""
    from ember.cluster.jobs import logs as job_logs

    job_logs(_client(address), job, follow, lambda text: print(text, end="", flush=True))


@app.command()
def stop(job: Annotated[str, typer.Argument(help="Job id.")], address: AddressOpt = None) -> None:
    """Stop a submitted job."""
    stopped = _client(address).stop_job(job)
    console.print(f"{job}: {'stop requested' if stopped else 'not running'}", markup=False)


@app.command("list")
def list_(address: AddressOpt = None) -> None:
    """Jobs on the cluster."""
    from ember.cluster.jobs import list_jobs

    for job_id, state, entrypoint in list_jobs(_client(address)):
        console.print(f"{job_id}  {state:10s}  {entrypoint}", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # ember's clients always send the token (read at ray import)
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
