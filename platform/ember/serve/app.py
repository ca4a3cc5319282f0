"""`ember serve`: a Ray Serve application serving one checkpoint over HTTP.

    app = build_app(ServeOptions(checkpoint=..., ep_size=2))    # a Serve Application
    run_server(options, console)                                # embedded Ray (or --address), then serve

Each replica of the `EmberServer` deployment owns a placement group of one bundle per expert-parallel rank
(serve/expert_actor.py); bundle 0 also holds the replica itself (the HTTP routes and the step loop), so
`spread_ranks` (STRICT_SPREAD) can put one rank on each Ray node. The HTTP proxy runs on the head node only,
bound to `host`. The replica's health check pings every rank; a rank that died or hangs fails it, and Serve
replaces the replica and with it the whole group (the survivors would otherwise block in their collectives).
Every replica start is counted by a small named actor of the application (StartCounter): starts beyond the
replica count are restarts, which /metrics reports.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ember.checkpoint.readers import read_checkpoint_spec
from ember.data.tokenizer import checkpoint_tokenizer
from ember.errors import UserError
from ember.generation.precision import DTYPES
from ember.generation.sampling import SamplingParams
from ember.serve.batching import StepLoop
from ember.serve.chat import ChatTemplate
from ember.serve.expert_actor import LoopConfig, ShardGroup
from ember.serve.http import build_api
from ember.serve.images import ImageQuery, ImageSampler
from ember.serve.memory import default_kv_cache_mb, kv_bytes_per_sequence, sequences_per_rank
from ember.serve.metrics import RequestCounts, prometheus_text
from ember.serve.placement import serving_spec
from ember.serve.protocol import ApiError, ChatRequest
from ray import serve

HEALTH_PING_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class ServeOptions:
    checkpoint: str  # the checkpoint folder itself (resolved from a run folder before Ray starts)
    ep_size: int = 1
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    name: str = "ember"
    max_batch: int = 64  # running sequences per replica
    kv_cache_mb: float | None = None  # per rank; admission waits for room in it (default: half the free memory)
    max_waiting: int | None = None  # sequences waiting for a slot before requests get 503; default 4 x max_batch
    served_model_name: str | None = None  # the `model` clients name; default: `name`
    chat_template: str | None = None  # Jinja2 source (--chat-template FILE), checked by check_options
    max_tokens_limit: int | None = None  # per request; default: the model's context length
    max_body_bytes: int = 1 << 16
    replica_cpus: float = 0.25
    rank_cpus: float = 0.5
    use_gpu: bool = False
    dtype: str = "auto"  # weights and KV cache: generation/precision.py (auto: fp32 on CPU, 16-bit on a GPU)
    spread_ranks: bool = False  # one EP rank per Ray node (STRICT_SPREAD) instead of packed where they fit
    verified: bool = False  # the checkpoint folder was resolved and its checksums checked (check_options)
    deployment_id: str = ""  # names this deployment's StartCounter (set by build_app)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.name


class StartCounter:
    """Counts the starts of one deployment's replicas (a named Ray actor; restarts = starts - replicas)."""

    def __init__(self) -> None:
        self.starts = 0

    def started(self) -> int:
        self.starts += 1
        return self.starts

    def count(self) -> int:
        return self.starts


COUNTER_NAMESPACE = "ember-serve"


def counter_name(options: ServeOptions) -> str:
    return f"starts-{options.name}-{options.deployment_id}"


def start_counter(options: ServeOptions):
    import ray

    remote = ray.remote(num_cpus=0)(StartCounter)
    # DEFAULT: outside the replica's placement group, which goes (with what it holds) when the replica dies
    return remote.options(name=counter_name(options), namespace=COUNTER_NAMESPACE, get_if_exists=True,
                          lifetime="detached", scheduling_strategy="DEFAULT").remote()  # fmt: skip


@serve.deployment
@serve.ingress()
class EmberServer:
    async def __init__(self, options: ServeOptions) -> None:
        self.options, self.model_name, self.counts = options, options.model_name, RequestCounts()
        self.health_checks = 0
        self.starts = start_counter(options)
        await self.starts.started.remote()
        checkpoint, _, spec = read_checkpoint_spec(Path(options.checkpoint), verify=False)  # check_options did
        self.family, self.step_loop, self.sampler = spec.model.family, None, None
        self.chat_template = ChatTemplate(options.chat_template) if options.chat_template else None
        if self.family == "gpt":
            self.seq_len, self.vocab_size = spec.model.seq_len, spec.model.vocab_size
            self.max_tokens_limit = options.max_tokens_limit or self.seq_len
            self.group = await ShardGroup.start(
                str(checkpoint), options.ep_size, options.rank_cpus, options.use_gpu, options.dtype
            )
            element_size = DTYPES[self.group.descriptions[0]["dtype"]].itemsize
            self.tokenizer = checkpoint_tokenizer(checkpoint, spec)  # prompts in, text out (rank 0 has its own)
            self.max_sequences = options.max_waiting or 4 * options.max_batch
            self.kv_cache_mb = options.kv_cache_mb or default_kv_cache_mb(self.group.descriptions)
            self.sequences_per_rank = per_rank = sequences_per_rank(
                spec.model, self.kv_cache_mb, options.max_batch, element_size
            )
            self.kv_bytes = kv_bytes_per_sequence(spec.model, element_size)
            driver = await self.group.run(LoopConfig(options.max_batch, per_rank))  # the loop runs in rank 0
            self.step_loop = StepLoop(driver, self.max_sequences)
            self.step_loop.start()
        else:
            self.seq_len = self.max_tokens_limit = self.vocab_size = self.max_sequences = 0
            self.sampler = ImageSampler(checkpoint, spec)
            self.image_lock = asyncio.Lock()
        self.checkpoint = str(checkpoint)

    def __serve_build_asgi_app__(self):
        return build_api(self, self.options.token, self.options.max_body_bytes, self.counts)

    # ---- what the routes use (serve/http.py's Backend) ----
    def describe(self) -> dict[str, Any]:
        info = {"id": self.options.name, "family": self.family, "checkpoint": self.checkpoint}
        if self.step_loop is not None:
            info.update(ep_size=self.options.ep_size, context_length=self.seq_len, steps=self.step_loop.stats.steps,
                        kv_cache_mb=self.kv_cache_mb, sequences_per_rank=self.sequences_per_rank,
                        ranks=self.group.descriptions)  # fmt: skip
        return info

    def failure(self) -> str | None:
        if self.step_loop is None:
            return None
        if self.step_loop.failure is not None:
            return str(self.step_loop.failure)
        if self.step_loop.task is not None and self.step_loop.task.done():
            return "the step loop stopped"
        return self.group.failure()

    def generate(self, prompt: list[int], max_tokens: int, params: SamplingParams, stop: list[str],
                 logprobs: int | None = None, prompt_logprobs: bool = False):  # fmt: skip
        return self.step_loop.generate(prompt, max_tokens, params, stop, logprobs, prompt_logprobs)

    def room(self, sequences: int) -> bool:
        return self.step_loop.room(sequences)

    def chat_prompt(self, request: ChatRequest) -> str:
        if self.chat_template is None:
            raise ApiError(400, "this server has no chat template: start `ember serve` with --chat-template FILE "
                           "(a Jinja2 template, as Hugging Face tokenizers use) to serve /v1/chat/completions",
                           "messages", "no_chat_template")  # fmt: skip
        return self.chat_template.render(request.messages)

    async def metrics(self) -> str:
        restarts = max(0, await self.starts.count.remote() - self.options.replicas)
        gauges = {
            "ember_replica_restarts_total": ("counter", "Replica starts beyond the first of each.", restarts),
            "ember_health_checks_total": ("counter", "Health checks this replica passed.", self.health_checks),
        }
        if self.step_loop is not None:
            stats = self.step_loop.stats  # rank 0's step loop's, as of the replica's last poll
            gauges.update({
                "ember_generated_tokens_total": ("counter", "Tokens generated by this replica.", stats.tokens_out),
                "ember_prompt_tokens_total": ("counter", "Prompt tokens admitted by this replica.", stats.tokens_in),
                "ember_queue_depth": ("gauge", "Sequences waiting for a slot.", stats.waiting),
                "ember_running_sequences": ("gauge", "Sequences in the running batch.", stats.running),
                "ember_steps_total": ("counter", "Decode steps run.", stats.steps),
                "ember_step_seconds_total": ("counter", "Seconds spent in decode steps.", stats.step_seconds),
                "ember_kv_cache_bytes": ("gauge", "KV cache of running sequences.", stats.running * self.kv_bytes),
            })  # fmt: skip
        return prometheus_text(self.counts, gauges)

    async def images(self, query: ImageQuery) -> list[bytes]:
        async with self.image_lock:  # one sampling at a time, off the event loop
            return await asyncio.to_thread(self.sampler.sample, query)

    def num_classes(self) -> int:
        return self.sampler.num_classes if self.sampler is not None else 0

    # ---- Serve hooks ----
    async def check_health(self) -> None:
        problem = self.failure()
        if problem:
            raise RuntimeError(problem)
        if self.step_loop is not None:
            await self.group.ping(HEALTH_PING_TIMEOUT_S)
        self.health_checks += 1


def check_options(options: ServeOptions) -> ServeOptions:
    """UserErrors before anything starts; returns the options with the checkpoint folder resolved."""
    checkpoint, _, spec = read_checkpoint_spec(Path(options.checkpoint), verify=not options.verified)
    if spec.model.family == "gpt":
        serving_spec(spec, options.ep_size)  # refuses an EP size that does not divide the experts
        refuse_expert_choice(spec.model)
        size = DTYPES[options.dtype].itemsize if options.dtype in DTYPES else 4  # auto: fp32 until a rank says
        sequences_per_rank(spec.model, options.kv_cache_mb, options.max_batch, size)  # refuses a budget holding none
    elif options.ep_size != 1:
        raise UserError(f"--ep {options.ep_size}: a {spec.model.family} model is served by one process; use --ep 1")
    if options.chat_template is not None:
        try:
            ChatTemplate(options.chat_template)
        except ValueError as exc:
            raise UserError(f"--chat-template: not a Jinja2 template ({exc})") from exc
    return replace(options, checkpoint=str(checkpoint), verified=True)


def refuse_expert_choice(model) -> None:
    """Expert-choice routing picks each expert's tokens among the whole batch: a served token's output would
    depend on the other requests in its step, so served text could not equal `ember generate`'s."""
    for block in model.moe_layers:
        if model.moe_layer_spec(block).routing == "expert_choice":
            raise UserError(
                f"model.moe.routing: expert_choice (block {block}) cannot be served: each expert picks its tokens "
                "among the whole batch, so a request's output would depend on the others decoded with it; "
                "serve a token_choice model"
            )


def build_app(options: ServeOptions):
    """The Serve application: one deployment whose replicas each own their ranks' placement group."""
    options = check_options(options)
    options = replace(options, deployment_id=options.deployment_id or secrets.token_hex(4))
    _, _, spec = read_checkpoint_spec(Path(options.checkpoint), verify=False)
    ranks = options.ep_size if spec.model.family == "gpt" else 0
    deployment = EmberServer.options(
        name=options.name,
        num_replicas=options.replicas,
        max_ongoing_requests=max(4 * options.max_batch, 256),  # the default (5) would cap the batch at 5
        ray_actor_options={"num_cpus": options.replica_cpus},
        # Fractional CPUs: with Serve's default of 1 CPU per replica and per rank, 2 cores never fit EP=2.
        # PACK keeps a replica's ranks on one node when they fit, and spreads them when they do not;
        # STRICT_SPREAD (--spread-ranks) puts each rank on a node of its own, or waits for one.
        placement_group_bundles=replica_bundles(options, ranks),
        placement_group_strategy="STRICT_SPREAD" if options.spread_ranks else "PACK",
        health_check_period_s=5,
        health_check_timeout_s=60,
    )
    return deployment.bind(options)


def replica_bundles(options: ServeOptions, ranks: int) -> list[dict[str, float]]:
    """Bundle r holds EP rank r; bundle 0 also the replica (Serve places it there), so that with STRICT_SPREAD
    a group of N ranks needs N nodes, not N + 1."""
    rank = {"CPU": options.rank_cpus, **({"GPU": 1} if options.use_gpu else {})}
    bundles = [dict(rank) for _ in range(ranks)] or [{"CPU": 0.0}]
    bundles[0]["CPU"] += options.replica_cpus
    return bundles


def start_application(options: ServeOptions, route_prefix: str = "/", app_name: str | None = None) -> None:
    """Deploy on the Ray this process is connected to; returns once every replica answers."""
    # HeadOnly: one proxy, bound to `host` (an address of the head); a proxy on another node could not bind it
    serve.start(proxy_location="HeadOnly", http_options={"host": options.host, "port": options.port})
    serve.run(build_app(options), name=app_name or options.name, route_prefix=route_prefix, blocking=False)


def run_server(options: ServeOptions, address: str | None, device: str, say) -> None:
    """`ember serve`: start (or join) Ray, deploy, and serve until interrupted."""
    import ray

    options = check_options(options)
    needed = options.replicas * (options.replica_cpus + options.ep_size * options.rank_cpus)
    if address is None:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(needed + 1)), include_dashboard=False, namespace="ember")
    else:
        ray.init(address=address, namespace="ember")
    started = time.monotonic()
    try:
        check_cluster(options, address)
    except UserError:
        ray.shutdown()  # before Serve starts: a cluster's running Serve is left alone
        raise
    try:
        has_gpus = ray.cluster_resources().get("GPU", 0) >= options.ep_size
        options = replace(options, use_gpu=device == "cuda" or (device == "auto" and has_gpus),
                          deployment_id=secrets.token_hex(4))  # fmt: skip
        start_application(options)
        where = f"http://{options.host}:{options.port}"
        ready = time.monotonic() - started
        say(f"serving {options.checkpoint} (EP={options.ep_size}, {options.replicas} replica(s)) at {where}; "
            f"ready in {ready:.1f} s; Ctrl-C stops")  # fmt: skip
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        _kill_counter(options)
        ray.shutdown()


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::")
HEAD_RESOURCE = "node:__internal_head__"  # what Ray's head node alone holds


def check_cluster(options: ServeOptions, address: str | None) -> None:
    """UserErrors for what the cluster cannot do: too few nodes to spread the ranks over, or a --host that is
    not the head's (the one HTTP proxy runs there)."""
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"]]
    if options.spread_ranks and len(nodes) < options.ep_size:
        raise UserError(f"--spread-ranks: {options.ep_size} EP ranks need {options.ep_size} Ray nodes, one each; "
                        f"the cluster has {len(nodes)} alive")  # fmt: skip
    head = next((node for node in nodes if HEAD_RESOURCE in node["Resources"]), None)
    names = () if head is None else (head["NodeManagerAddress"], head["NodeManagerHostname"])
    if address is not None and names and options.host not in (*names, *LOCAL_HOSTS):
        raise UserError(f"--host {options.host}: the HTTP port opens on the Ray head node; give its address "
                        f"({names[0]}) or 0.0.0.0")  # fmt: skip


def _kill_counter(options: ServeOptions) -> None:
    """The detached counter outlives the application on a cluster this process only joined."""
    import ray

    try:
        ray.kill(ray.get_actor(counter_name(options), namespace=COUNTER_NAMESPACE))
    except ValueError:  # no replica started
        pass
