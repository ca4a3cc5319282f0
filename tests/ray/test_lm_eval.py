"""lm-evaluation-harness's `local-completions` model against a real `ember serve` (127.0.0.1, EP=1).

lm-eval scores a small loglikelihood task it reads from files this module writes (a JSON lines dataset of
standard-library source lines and a task YAML; nothing is downloaded). It tokenizes with the Hugging Face
tokenizer ember's exporter writes for a byte-level model and asks /v1/completions for echoed prompt log-probs
(max_tokens 1, logprobs 1, echo). Each sample's log-likelihood and is_greedy flag must equal the ones computed
directly from the checkpoint's model: one forward over context + continuation, log-softmax at the continuation.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import free_port
from tests.helpers.moe_checkpoint import TINY_MODEL, write_moe_checkpoint

pytestmark = pytest.mark.ray
TOKEN = "test-token-lm-eval"
SEQ_LEN = 64
TASK = "ember_stdlib_lines"
CODE_LINE = re.compile(r"^\s*(def|return|import|if|for|class) \S")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MoE GPT (4 experts) trained by two DeepSpeed ranks, with a 64-byte context for whole code lines."""
    return write_moe_checkpoint(tmp_path_factory.mktemp("lm-eval") / "run", 1, {**TINY_MODEL, "seq_len": SEQ_LEN})


@pytest.fixture(scope="module")
def server(run_dir: Path) -> Iterator[str]:
    import ray
    from ember.serve.app import ServeOptions, start_application
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, namespace="ember-test-lm-eval", log_to_driver=False)
    try:
        start_application(ServeOptions(checkpoint=str(run_dir), port=port, token=TOKEN, name="tiny"), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def hf_tokenizer_folder(out: Path) -> Path:
    """What `ember ckpt export --format hf` writes beside the weights of a byte-level model (this MoE GPT has no
    transformers twin, so only the tokenizer files are written, by the exporter's own function)."""
    from ember.data.tokenizer import bytes_tokenizer_json
    from ember.interop.huggingface import write_tokenizer_files

    out.mkdir()
    write_tokenizer_files(bytes_tokenizer_json(), out, SEQ_LEN)
    return out


def stdlib_pairs(count: int = 8) -> list[dict[str, str]]:
    """Code lines of os.py split at their last space before the middle: the context keeps no trailing space
    (lm-eval would move it to the continuation)."""
    pairs = []
    for line in Path(os.__file__).read_text().splitlines():
        line = line.strip()
        if CODE_LINE.match(line) and 16 <= len(line.encode()) < SEQ_LEN - 2 and line.isascii():
            split = line.rindex(" ", 0, len(line) // 2 + 1)
            pairs.append({"context": line[:split], "continuation": line[split:]})
        if len(pairs) == count:
            return pairs
    raise AssertionError("os.py has too few short code lines")


def write_task(folder: Path, pairs: list[dict[str, str]]) -> Path:
    data = folder / "lines.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    task = {
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "loglikelihood", "doc_to_text": "{{context}}",
        "doc_to_target": "{{continuation}}", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }  # fmt: skip
    (folder / f"{TASK}.yaml").write_text(json.dumps(task))  # JSON is YAML
    return folder


@torch.no_grad()
def direct_loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log-softmax at the continuation's bytes, and whether each was the argmax, from one forward."""
    context_ids, continuation_ids = list(context.encode()), list(continuation.encode())
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    rows = logprobs[len(context_ids) - 1 : -1]
    targets = torch.tensor(continuation_ids)
    picked = rows.gather(1, targets[:, None])[:, 0]
    return picked.sum().item(), bool((rows.argmax(dim=-1) == targets).all())


def test_lm_eval_local_completions_log_likelihoods_equal_the_checkpoints_model(
    server: str, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    from ember.serve.weights import load_rank_model

    tokenizer_dir = hf_tokenizer_folder(tmp_path / "hf")
    pairs = stdlib_pairs()
    text = "".join(pair["context"] + pair["continuation"] for pair in pairs) + "é€\n"
    assert AutoTokenizer.from_pretrained(tokenizer_dir)(text).input_ids == list(text.encode())  # ids are bytes
    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": TOKEN,
                        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{server}/v1/completions",
            "model": "tiny",
            "tokenizer": str(tokenizer_dir),
            "tokenizer_backend": "huggingface",
            "max_length": SEQ_LEN,
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(write_task(tmp_path, pairs))),
        log_samples=True,
    )
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    assert [sample["doc"] for sample in samples] == pairs
    model, _ = load_rank_model(run_dir)
    for sample in samples:
        served_loglikelihood, served_greedy = sample["resps"][0][0]  # one request per doc: [[(ll, greedy)]]
        expected_loglikelihood, expected_greedy = direct_loglikelihood(model, **sample["doc"])
        assert served_loglikelihood == pytest.approx(expected_loglikelihood, abs=1e-4), sample["doc"]
        assert served_greedy == expected_greedy, sample["doc"]
    assert results["results"][TASK]["acc,none"] == pytest.approx(
        sum(direct_loglikelihood(model, **pair)[1] for pair in pairs) / len(pairs)
    )
