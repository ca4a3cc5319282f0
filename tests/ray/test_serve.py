"""`ember serve` on a real Ray Serve (127.0.0.1): expert-parallel ranks against `ember generate`, the oracle.

One module-scoped server holds two applications on one HTTP port: the EP=2-trained checkpoint served with
EP=2 at / (model "ep2") and with EP=1 and a chat template at /ep1 (model "ep1"). Completions are compared token
for token with single-process generation; the `openai` package is the client where it can be.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from ember.generation.sampling import SamplingParams
from ember.serve.generate import generate
from tests.helpers.distributed import free_port

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role[0] }}:{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
)
PROMPTS = ["def ", "import os\n", "class Tree:\n    ", "    return ", "# ", "x = ", "for i in", "if __name__"]


@pytest.fixture(scope="module")
def run_dir(moe_run: Path) -> Path:
    """A tiny MoE GPT trained with EP=2 (4 experts, 2 per rank) by real DeepSpeed ranks (tests/conftest.py)."""
    return moe_run


@pytest.fixture(scope="module")
def server(run_dir: Path) -> Iterator[str]:
    import ray
    from ember.serve.app import ServeOptions, start_application
    from ray import serve

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, namespace="ember-test-serve", log_to_driver=False)
    try:
        common = {"checkpoint": str(run_dir), "port": port, "token": TOKEN, "max_body_bytes": 4096}
        start_application(ServeOptions(ep_size=2, name="ep2", **common), route_prefix="/")
        start_application(
            ServeOptions(ep_size=1, name="ep1", chat_template=CHAT_TEMPLATE, **common), route_prefix="/ep1"
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def complete(url: str, prompt: str, **fields) -> dict:
    response = requests.post(f"{url}/v1/completions", json={"prompt": prompt, **fields}, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def reference(run_dir: Path, prompt: str, max_tokens: int, **sampling) -> list[int]:
    return generate(run_dir, prompt, max_tokens, SamplingParams(**sampling)).tokens


def test_greedy_completions_with_ep2_equal_ember_generate(server: str, run_dir: Path) -> None:
    cli = subprocess.run(
        [sys.executable, "-m", "ember.cli", "generate", str(run_dir), "--prompt", PROMPTS[1], "--max-tokens", "24",
         "--greedy", "--json"],
        capture_output=True, text=True, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "platform")},
    )  # fmt: skip
    assert complete(server, PROMPTS[1], max_tokens=24, temperature=0)["tokens"] == json.loads(cli.stdout)["tokens"]
    for prompt in PROMPTS[:4]:
        assert complete(server, prompt, max_tokens=20, temperature=0)["tokens"] == reference(
            run_dir, prompt, 20, temperature=0
        )


def test_seeded_sampling_with_ep2_equals_ember_generate(server: str, run_dir: Path) -> None:
    for seed, (top_k, top_p) in enumerate([(None, None), (20, None), (None, 0.9), (50, 0.8)]):
        sampling = {"temperature": 0.8, "top_k": top_k, "top_p": top_p, "seed": seed}
        served = complete(server, PROMPTS[seed], max_tokens=20, **sampling)["tokens"]
        assert served == reference(run_dir, PROMPTS[seed], 20, **sampling)


def test_checkpoint_trained_with_ep2_served_with_ep1_gives_the_same_tokens(server: str, run_dir: Path) -> None:
    for prompt in PROMPTS[:3]:
        expected = reference(run_dir, prompt, 20, temperature=0)
        assert complete(f"{server}/ep1", prompt, max_tokens=20, temperature=0)["tokens"] == expected
        sampled = complete(f"{server}/ep1", prompt, max_tokens=20, temperature=1.0, seed=7)["tokens"]
        assert sampled == reference(run_dir, prompt, 20, temperature=1.0, seed=7)


def test_each_rank_holds_only_its_share_of_the_experts(server: str, run_dir: Path) -> None:
    from ember.models.layers.moe import is_expert_parameter
    from ember.serve.weights import load_rank_model

    single, _ = load_rank_model(run_dir)  # every expert in one process
    total = sum(p.numel() for p in single.parameters() if is_expert_parameter(p))
    ranks = requests.get(f"{server}/v1/models", headers=AUTH, timeout=30).json()["data"][0]["ranks"]
    assert [rank["experts"] for rank in ranks] == [{"1": [0, 1]}, {"1": [2, 3]}]  # block 1 is the MoE block
    assert [rank["expert_parameters"] for rank in ranks] == [total // 2, total // 2]
    (alone,) = requests.get(f"{server}/ep1/v1/models", headers=AUTH, timeout=30).json()["data"][0]["ranks"]
    assert alone["expert_parameters"] == total
    assert alone["experts"] == {"1": [0, 1, 2, 3]}


def test_sixteen_concurrent_clients_get_their_own_answers(server: str, run_dir: Path) -> None:
    jobs = [(PROMPTS[i % len(PROMPTS)], {"temperature": 0.0 if i % 2 else 0.9, "seed": i}) for i in range(16)]
    steps_before = requests.get(f"{server}/healthz", timeout=30).json()["steps"]
    with ThreadPoolExecutor(16) as pool:
        served = list(pool.map(lambda job: complete(server, job[0], max_tokens=16, **job[1])["tokens"], jobs))
    for (prompt, sampling), tokens in zip(jobs, served, strict=True):
        assert tokens == reference(run_dir, prompt, 16, **sampling)
    steps = requests.get(f"{server}/healthz", timeout=30).json()["steps"] - steps_before
    assert steps < 16 * 16  # sequences shared decode steps (continuous batching), not one step per token


def test_streaming_delivers_tokens_one_event_at_a_time(server: str, run_dir: Path) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "stream": True}
    with requests.post(f"{server}/v1/completions", json=body, headers=AUTH, stream=True, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in response.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    choices = [json.loads(event)["choices"][0] for event in events[:-1]]
    assert [choice["token"] for choice in choices] == reference(run_dir, PROMPTS[0], 12, temperature=0)
    assert [choice["finish_reason"] for choice in choices] == [None] * 11 + ["length"]


BAD_REQUESTS = {
    "missing prompt": ({"max_tokens": 4}, 400, "prompt"),
    "prompt of the wrong type": ({"prompt": 5}, 400, "prompt"),
    "max_tokens as a string": ({"prompt": "a", "max_tokens": "4"}, 400, "max_tokens"),
    "max_tokens over the limit": ({"prompt": "a", "max_tokens": 10_000}, 400, "max_tokens"),
    "negative temperature": ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    "top_p above 1": ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    "unknown field": ({"prompt": "a", "bogus": 3}, 400, "bogus"),
    "prompt longer than the context": ({"prompt": "a" * 100}, 400, "prompt"),
    "seed over 2^63 - 1": ({"prompt": "a", "seed": 2**64}, 400, "seed"),
    "a token outside the vocabulary": ({"prompt": [1, 300]}, 400, "prompt"),
    "best_of other than n": ({"prompt": "a", "best_of": 3}, 400, "best_of"),
    "suffix": ({"prompt": "a", "suffix": "b"}, 400, "suffix"),
    "another model": ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_a_bad_field_gets_a_4xx_naming_it_and_the_server_keeps_serving(server: str, name: str) -> None:
    body, status, field = BAD_REQUESTS[name]
    response = requests.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=30)
    assert (response.status_code, response.json()["error"]["param"]) == (status, field)
    assert complete(server, "ok", max_tokens=2)["finish_reason"] == "length"


def test_bad_json_oversized_bodies_and_missing_auth_get_4xx(server: str) -> None:
    url = f"{server}/v1/completions"
    headers = {**AUTH, "Content-Type": "application/json"}
    cases = [
        (requests.post(url, data="{not json", headers=headers, timeout=30), 400, None),
        (requests.post(url, data=json.dumps({"prompt": "a" * 10_000}), headers=headers, timeout=30), 413, "body"),
        (requests.post(url, json={"prompt": "a"}, timeout=30), 401, "Authorization"),
        (requests.post(url, json={"prompt": "a"}, headers={"Authorization": "Bearer wrong"}, timeout=30), 401,
         "Authorization"),
        (requests.get(f"{server}/v1/models", timeout=30), 401, "Authorization"),
        (requests.post(f"{server}/v1/images", json={"n": 1}, headers=AUTH, timeout=30), 400, "model"),
        (requests.get(f"{server}/v2/nothing", headers=AUTH, timeout=30), 404, None),
    ]  # fmt: skip
    for response, status, field in cases:
        assert (response.status_code, response.json()["error"]["param"]) == (status, field)
    assert requests.get(f"{server}/healthz", timeout=30).json()["status"] == "ok"  # open to probes
    assert complete(server, "ok", max_tokens=2)["finish_reason"] == "length"


def test_cli_refuses_a_missing_checkpoint_and_a_corrupt_manifest_with_exit_2(run_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}

    def serve(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ember.cli", "serve", str(path), "--ep", "2"], env=env,
                              capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip

    missing = serve(tmp_path / "nothing")
    assert missing.returncode == 2
    assert "no such run or checkpoint folder" in missing.stderr
    checkpoint = next((run_dir / "checkpoints").glob("step_*"))  # beside them: the run lock
    corrupt = tmp_path / "corrupt" / checkpoint.name
    shutil.copytree(checkpoint, corrupt)
    (corrupt / "manifest.json").write_text("{ truncated")
    broken = serve(corrupt)
    assert broken.returncode == 2
    assert "error:" in broken.stderr


@pytest.fixture(scope="module")
def gan_url(server: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """jobs/debug/tiny-gan.yaml trained 2 steps on 1 rank (torchrun), served at /gan beside the GPT."""
    from ember.data.build_images import build_image_shards
    from ember.serve.app import ServeOptions, start_application

    root = tmp_path_factory.mktemp("gan")
    shards = root / "digits"
    build_image_shards(shards, "digits", shard_size=200)
    items = [f"run_dir={root / 'run'}", f"data.train.urls={shards}/train-{{000000..000006}}.tar",
             f"data.val.urls={shards}/val-000000.tar", "data.build=null", "schedule.steps=2",
             "schedule.eval_every=2", "checkpoint.every_n_steps=2", "logging.sample_every=0"]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
               str(free_port()), "-m", "ember.train.torchrun", str(REPO / "jobs" / "debug" / "tiny-gan.yaml"),
               *[part for item in items for part in ("--set", item)]]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    port = int(server.rsplit(":", 1)[1])
    start_application(ServeOptions(str(root / "run"), port=port, token=TOKEN, name="gan"), route_prefix="/gan")
    return f"{server}/gan"


def test_images_endpoint_returns_seeded_class_conditional_pngs(gan_url: str) -> None:
    import base64
    import io

    from PIL import Image

    def images(**fields) -> list[bytes]:
        response = requests.post(f"{gan_url}/v1/images", json=fields, headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        return [base64.b64decode(item["b64_png"]) for item in response.json()["data"]]

    first = images(class_label=3, n=2, seed=1)
    assert [Image.open(io.BytesIO(png)).size for png in first] == [(8, 8), (8, 8)]
    assert images(class_label=3, n=2, seed=1) == first
    assert images(class_label=3, n=2, seed=2) != first
    wrong = requests.post(f"{gan_url}/v1/images", json={"class_label": 99}, headers=AUTH, timeout=30)
    assert (wrong.status_code, wrong.json()["error"]["param"]) == (400, "class_label")
    text = requests.post(f"{gan_url}/v1/completions", json={"prompt": "a"}, headers=AUTH, timeout=30)
    assert (text.status_code, text.json()["error"]["param"]) == (400, "model")


def test_a_killed_rank_restarts_the_whole_group_and_serving_resumes(server: str, run_dir: Path) -> None:
    """kill -9 of EP rank 1: the replica's health check fails, Serve replaces the replica and all its ranks."""

    def ranks() -> list[dict] | None:
        try:
            response = requests.get(f"{server}/v1/models", headers=AUTH, timeout=10)
        except requests.RequestException:
            return None
        return response.json()["data"][0]["ranks"] if response.status_code == 200 else None

    before, restarted = ranks(), restarts(server)
    os.kill(before[1]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 240
    while (now := ranks()) is None or {r["pid"] for r in now} & {r["pid"] for r in before}:
        assert time.monotonic() < deadline, "the group was not restarted"
        time.sleep(1)
    expected = reference(run_dir, PROMPTS[2], 16, temperature=0)
    assert complete(server, PROMPTS[2], max_tokens=16, temperature=0)["tokens"] == expected
    assert restarts(server) == restarted + 1  # what /metrics counts


def test_a_stop_string_ends_the_completion_with_finish_reason_stop(server: str, run_dir: Path) -> None:
    from ember.generation.sampling import decode_bytes

    expected = reference(run_dir, PROMPTS[3], 20, temperature=0.9, seed=4)
    stop = decode_bytes(expected[:3])  # text this completion produces by its third token
    choice = complete(server, PROMPTS[3], max_tokens=20, temperature=0.9, seed=4, stop=stop)  # a string, or a list
    assert choice["finish_reason"] == "stop"
    assert stop in decode_bytes(choice["tokens"])
    assert choice["tokens"] == expected[: len(choice["tokens"])]
    assert len(choice["tokens"]) <= 3
    assert choice["text"] == decode_bytes(choice["tokens"]).split(stop)[0]  # as OpenAI: the stop string left out


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


def reference_completion(run_dir: Path, prompt: str, max_tokens: int, stop: list[str] | None = None, **sampling):
    return generate(run_dir, prompt, max_tokens, SamplingParams(**sampling), stop)


def test_openai_client_batches_prompts_with_n_stop_penalties_and_user(server: str, run_dir: Path) -> None:
    prompts, sampling = PROMPTS[:2], {"temperature": 0.8, "presence_penalty": 0.5, "frequency_penalty": 0.3}
    done = openai_client(server).completions.create(
        model="ep2", prompt=prompts, max_tokens=10, n=2, seed=3, stop="\n", user="someone", **sampling
    )
    assert (done.object, done.model, done.id.startswith("cmpl-"), done.created > 0) == (
        "text_completion",
        "ep2",
        True,
        True,
    )
    assert [choice.index for choice in done.choices] == [0, 1, 2, 3]
    for choice in done.choices:
        prompt, copy = prompts[choice.index // 2], choice.index % 2
        expected = reference_completion(run_dir, prompt, 10, ["\n"], seed=3 + copy, **sampling)
        assert (choice.text, choice.finish_reason) == (expected.text.split("\n")[0], expected.finish_reason)
    assert done.usage.prompt_tokens == sum(len(p.encode()) for p in prompts)
    assert done.usage.completion_tokens == sum(len(choice.to_dict()["tokens"]) for choice in done.choices)


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(server: str, run_dir: Path) -> None:
    """What evaluation harnesses send for log-likelihoods: echo, max_tokens 0, logprobs 1."""
    import torch

    from ember.serve.weights import load_rank_model

    text = "def add(a, b):"
    done = openai_client(server).completions.create(model="ep2", prompt=text, max_tokens=0, echo=True, logprobs=1)
    (choice,) = done.choices
    model, _ = load_rank_model(run_dir)
    tokens = list(text.encode())
    with torch.no_grad():
        table = model(torch.tensor([tokens])).logits[0].float().log_softmax(-1)
    expected = [table[i, token].item() for i, token in enumerate(tokens[1:])]
    assert choice.text == text
    assert choice.logprobs.token_logprobs[0] is None
    assert done.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert choice.logprobs.tokens == list(text)
    assert choice.logprobs.text_offset == list(range(len(text)))
    best = [max(top.values()) for top in choice.logprobs.top_logprobs[1:]]
    assert best == pytest.approx(table[:-1].max(-1).values.tolist(), abs=1e-4)


def test_openai_client_streams_with_usage_and_every_chunk_names_the_model(server: str, run_dir: Path) -> None:
    chunks = list(openai_client(server).completions.create(
        model="ep2", prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert {(c.object, c.model, c.id) for c in chunks} == {("text_completion", "ep2", chunks[0].id)}
    *tokens, last = chunks
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 8)
    assert (
        "".join(c.choices[0].text for c in tokens) == reference_completion(run_dir, PROMPTS[0], 8, temperature=0).text
    )
    assert all(len(c.choices[0].logprobs.top_logprobs[0]) >= 2 for c in tokens)


def test_openai_client_reads_errors_through_param_type_and_code(server: str) -> None:
    import openai

    client = openai_client(server)
    cases = [
        (openai.BadRequestError, "best_of", {"prompt": "a", "best_of": 2}),
        (openai.BadRequestError, "suffix", {"prompt": "a", "suffix": "b"}),
        (openai.BadRequestError, "seed", {"prompt": "a", "seed": 2**64}),
        (openai.BadRequestError, "temperature", {"prompt": "a", "temperature": -1}),
        (openai.BadRequestError, "stream_options", {"prompt": "a", "stream_options": {"include_usage": True}}),
        (openai.NotFoundError, "model", {"prompt": "a", "model": "gpt-3.5-turbo-instruct"}),
    ]
    for kind, param, fields in cases:
        with pytest.raises(kind) as raised:
            client.completions.create(**{"model": "ep2", **fields})
        assert (raised.value.param, raised.value.type) == (param, "invalid_request_error"), fields
        assert raised.value.code
    with pytest.raises(openai.AuthenticationError) as raised:
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).completions.create(
            model="ep2", prompt="a"
        )
    assert raised.value.code == "invalid_api_key"
    assert client.models.retrieve("ep2").id == "ep2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_completions_render_the_served_template(server: str, run_dir: Path) -> None:
    import openai

    messages = [{"role": "system", "content": "be"}, {"role": "user", "content": "def f"}]
    done = openai_client(f"{server}/ep1").chat.completions.create(
        model="ep1", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    expected = reference_completion(run_dir, "s:be\nu:def f\na:", 8, temperature=0)
    (choice,) = done.choices
    assert (done.object, choice.message.role, choice.message.content) == ("chat.completion", "assistant", expected.text)
    assert [entry.bytes[0] for entry in choice.logprobs.content] == expected.tokens
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client(server).chat.completions.create(model="ep2", messages=messages)
    assert "--chat-template" in raised.value.message
    assert raised.value.code == "no_chat_template"


def restarts(url: str) -> int:
    text = requests.get(f"{url}/metrics", headers=AUTH, timeout=30).text
    return int(
        float(next(line for line in text.splitlines() if line.startswith("ember_replica_restarts_total ")).split()[1])
    )


def test_metrics_are_prometheus_text(server: str) -> None:
    complete(server, "ok", max_tokens=2)
    text = requests.get(f"{server}/metrics", headers=AUTH, timeout=30).text
    for name in ("ember_generated_tokens_total", "ember_prompt_tokens_total", "ember_queue_depth",
                 "ember_running_sequences", "ember_step_seconds_total", "ember_replica_restarts_total"):  # fmt: skip
        assert f"# TYPE {name} " in text
        assert f"\n{name} " in text
    assert 'ember_requests_total{path="/v1/completions",status="200"}' in text
    assert requests.get(f"{server}/health", timeout=30).json()["status"] == "ok"


def fuzzed_bodies():
    """JSON bodies for both text routes: valid fields with wrong types, extremes, huge or empty values, unicode
    (lone surrogates too), token ids outside the vocabulary, unknown fields; generation kept short."""
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)

    def nested(inner):
        return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)

    values = st.recursive(scalars, nested, max_leaves=8)
    extremes = st.sampled_from([
        0, -1, 1, 2, 20, 21, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63), 1e-300, 1e300, 1e-5, 0.5, 2.0, 100.0,
        "", "a" * 3000, "\x00", "\ud800", "ﬀ𝔘é\n", [], {}, [300], [255, 0, 1], [[1, 2], [3]], [0] * 40, [-1], ["", "x"],
        ["\n"] * 9, True, {"include_usage": True}, {"include_usage": "yes"}, {"300": 5}, {"7": 100}, {"²": 1},
        [{"role": "user", "content": "hi"}], [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": "nobody"}], "ep2", "ep1", "gpt-4",
    ])  # fmt: skip
    names = st.sampled_from([
        "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "n", "best_of", "stop", "stream",
        "stream_options", "logprobs", "echo", "presence_penalty", "frequency_penalty", "repetition_penalty",
        "logit_bias", "user", "suffix", "model", "messages", "max_completion_tokens", "top_logprobs", "bogus", "",
    ])  # fmt: skip
    fields = st.dictionaries(names, extremes | values, max_size=4)
    within_bounds = st.fixed_dictionaries({}, optional={
        "temperature": st.floats(0, 2), "top_k": st.integers(-1, 300), "top_p": st.floats(0.01, 1),
        "seed": st.integers(0, 2**63 - 1), "n": st.integers(1, 3), "logprobs": st.integers(0, 5), "echo": st.booleans(),
        "stream": st.booleans(), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.01, 10), "stop": st.text(min_size=1, max_size=3),
        "logit_bias": st.dictionaries(st.integers(0, 255).map(str), st.floats(-100, 100), max_size=3),
    })  # fmt: skip
    base = st.fixed_dictionaries(
        {"prompt": st.sampled_from(PROMPTS) | st.text(max_size=12), "max_tokens": st.integers(0, 3)}
    )
    chat = st.fixed_dictionaries({"messages": st.just([{"role": "user", "content": "hi"}]), "max_tokens": st.just(2)})
    route = st.sampled_from(
        [f"{app}/v1/{kind}" for app in ("", "/ep1") for kind in ("completions", "chat/completions")]
    )
    bodies = st.tuples(st.one_of(base, chat, st.just({})), within_bounds, st.just({}) | fields)
    return st.tuples(route, bodies.map(lambda parts: {key: v for part in parts for key, v in part.items()}))


def test_two_thousand_fuzzed_bodies_get_200_or_an_openai_4xx_and_break_nothing(server: str, run_dir: Path) -> None:
    from hypothesis import HealthCheck, given, settings

    session, statuses = requests.Session(), []
    restarts_before = restarts(server), restarts(f"{server}/ep1")

    @settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(fuzzed_bodies())
    def post(case) -> None:
        path, body = case
        data = json.dumps(body).encode("utf-8", errors="surrogatepass")
        headers = {**AUTH, "Content-Type": "application/json"}
        response = session.post(f"{server}{path}", data=data, headers=headers, timeout=120)
        statuses.append(response.status_code)
        assert response.status_code == 200 or 400 <= response.status_code < 500, (body, response.text)
        if response.status_code != 200:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
        else:  # a 200 stream carries no error event either
            assert 'data: {"error"' not in response.text, (body, response.text)

    post()
    assert len(statuses) >= 2000  # many generated, the rest refused
    assert statuses.count(200) >= 100
    assert (restarts(server), restarts(f"{server}/ep1")) == restarts_before
    expected = reference(run_dir, PROMPTS[1], 16, temperature=0)
    assert complete(server, PROMPTS[1], max_tokens=16, temperature=0)["tokens"] == expected


def test_langchain_openai_llm_with_its_defaults(server: str, run_dir: Path) -> None:
    from langchain_openai import OpenAI

    # its defaults (top_p 1, penalties 0, n 1, ...) but greedy, to compare, and max_tokens within the context
    llm = OpenAI(model="ep2", base_url=f"{server}/v1", api_key=TOKEN, temperature=0, max_tokens=12, max_retries=0)
    expected = reference_completion(run_dir, PROMPTS[2], 12, ["\n"], temperature=0)
    assert llm.invoke(PROMPTS[2], stop=["\n"]) == expected.text.split("\n")[0]
    assert [piece for piece in llm.stream(PROMPTS[2])]
    assert (llm.batch(PROMPTS[:2]) == [
        reference_completion(run_dir, prompt, 12, temperature=0).text for prompt in PROMPTS[:2]
    ])
