"""`ember ckpt export --format hf` on real checkpoints: an expert-parallel DeepSpeed one loads in transformers'
Mixtral with the sharded model's logits (experts gathered from both EP ranks' files); a Llama-style run on a
byte-level BPE carries its tokenizer, and `ember generate` prints the text transformers generates and decodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ember.data.build import build_text_shards
from ember.train.objectives.lm import split_batch
from tests.distributed.test_export import MICRO, text_rows, train_save_and_probe
from tests.helpers.distributed import free_port, run_on_ranks

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
transformers = pytest.importorskip("transformers")


def mixtral_spec() -> dict:
    return {
        "name": "hf-export-test",
        "model": {"d_model": 32, "n_heads": 2, "n_layers": 2, "seq_len": 32, "norm": "rmsnorm", "position": "rope",
                  "mlp": "swiglu", "bias": False, "tie_embeddings": False,
                  "moe": {"num_experts": 4, "top_k": 2, "ep_size": 2, "every_n_layers": 1, "drop_tokens": False}},
        "data": {"train": {"urls": "unused.tar"}},
        "engine": {"kind": "deepspeed", "zero_stage": 2},
        "optim": {"lr": 1e-2},
        "schedule": {"steps": 3, "micro_batch": MICRO},
        "cluster": {"num_workers": 2, "device": "cpu"},
    }


def test_hf_export_of_an_expert_parallel_checkpoint_loads_in_transformers_with_its_logits(tmp_path: Path) -> None:
    sharded = run_on_ranks(train_save_and_probe, 2, str(tmp_path), mixtral_spec())
    out = tmp_path / "hf"
    command = [sys.executable, "-m", "ember.cli", "ckpt", "export", str(tmp_path), "--format", "hf", "--out", str(out)]
    assert "MixtralForCausalLM" in subprocess.run(command, check=True, capture_output=True, text=True).stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(split_batch(text_rows(100_000, MICRO))[0]).logits
    torch.testing.assert_close(logits, sharded[0], rtol=1e-4, atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # a byte model ships its bytes as a tokenizer
    assert tokenizer("déf").input_ids == list("déf".encode())
    assert tokenizer.decode(list(b"x = 1")) == "x = 1"


def ember(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], check=True, capture_output=True, text=True).stdout


def test_a_bpe_llama_run_generates_the_text_transformers_decodes_from_its_export(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    build_text_shards(shards, train_shards=2, max_bytes=400_000, val_fraction=0.2, tokenizer="bpe", vocab_size=320)
    items = [f"run_dir={tmp_path / 'run'}", f"data.train.urls={shards}/train-{{000000..000001}}.tar",
             f"data.val.urls={shards}/val-000000.tar", "data.build=null", f"data.tokenizer={shards}/tokenizer.json",
             "model.vocab_size=320", "model.norm=rmsnorm", "model.position=rope", "model.mlp=swiglu",
             "model.bias=false", "cluster.num_workers=1", "schedule.global_batch=4", "logging.sample_tokens=0"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
                    str(free_port()), "-m", "ember.train.torchrun", str(REPO / "jobs" / "debug" / "tiny-dense.yaml"),
                    *[p for item in items for p in ("--set", item)]], check=True, capture_output=True)
    assert (tmp_path / "run" / "checkpoints" / "step_000020" / "tokenizer.json").is_file()
    prompt = "def main():\n    "
    ours = json.loads(ember("generate", str(tmp_path / "run"), "--prompt", prompt, "--max-tokens", "16",
                            "--temperature", "0", "--json"))
    assert "LlamaForCausalLM" in ember("ckpt", "export", str(tmp_path / "run"), "--format", "hf",
                                       "--out", str(tmp_path / "hf"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    assert ours["tokens"] == generated.tolist()
    assert ours["text"] == tokenizer.decode(generated)
