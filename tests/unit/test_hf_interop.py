"""ember <-> Hugging Face transformers, no download: every model is made here and saved to a folder.

For each class with the same function (Llama, GPT-2, Mixtral, Qwen2-MoE): a small ember model exported, loaded
with AutoModelForCausalLM.from_pretrained, gives ember's logits within fp32 tolerance and the same greedy tokens;
a randomly initialised transformers model saved locally, loaded through model.init_from, gives its logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from ember.errors import UserError
from ember.generation.decode import Admit, DecodeRunner, StepPlan
from ember.generation.sampling import SamplingParams
from ember.interop.huggingface import export_model, load_into, twin_class
from ember.models import build_model
from ember.spec.model import GPTSpec
from ember.world import ExpertPlacement

transformers = pytest.importorskip("transformers")

BASE = {"vocab_size": 97, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 48, "seq_len": 24}
LLAMA = BASE | {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "bias": False, "tie_embeddings": False,
                "rope_theta": 500.0, "norm_eps": 1e-6}
MOE = {"num_experts": 4, "top_k": 2, "drop_tokens": False, "every_n_layers": 1}
SPECS = {
    "LlamaForCausalLM": LLAMA,
    "GPT2LMHeadModel": BASE,
    "LlamaForCausalLM-gqa": LLAMA | {"n_kv_heads": 2},
    "MixtralForCausalLM": LLAMA | {"n_kv_heads": 1, "moe": MOE},
    "Qwen2MoeForCausalLM": LLAMA | {"tie_embeddings": True, "moe": MOE | {
        "top_k": 3, "shared_experts": 2, "shared_expert_gate": True, "every_n_layers": 2}},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def ember_model(fields: dict, seed: int = 0):
    model = build_model(GPTSpec(**fields), seed=seed).eval()
    with torch.no_grad():  # away from init's zeros and ones, so every tensor's placement matters
        for name, param in model.named_parameters():
            if "ln" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits, model


def greedy_with_kv_cache(model, prompt: list[int], count: int) -> list[int]:
    """What `ember generate` does: prefill, then one token at a time from the KV cache."""
    runner = DecodeRunner(model)
    plan, generated = StepPlan(admit=[Admit(0, prompt, SamplingParams(temperature=0.0))]), []
    for _ in range(count):
        generated.append(runner.step(plan)[0].token)
        plan = StepPlan(decode=[0])
    return generated


@pytest.mark.parametrize("architecture", sorted(SPECS))
def test_export_loads_in_transformers_with_the_same_logits_and_greedy_tokens(architecture, tmp_path):
    model = ember_model(SPECS[architecture])
    assert export_model(model, model.spec, tmp_path) == architecture.split("-")[0]
    ids = torch.randint(0, model.spec.vocab_size, (2, model.spec.seq_len), generator=torch.Generator().manual_seed(1))
    theirs, hf = hf_logits(tmp_path, ids)
    assert type(hf).__name__ == architecture.split("-")[0]
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    prompt = ids[0, :5].tolist()
    with torch.no_grad():
        generated = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert greedy_with_kv_cache(model, prompt, 12) == generated[0, 5:].tolist()


@pytest.mark.parametrize("architecture", sorted(SPECS))
def test_init_from_a_transformers_model_gives_its_logits(architecture, tmp_path):
    donor = ember_model(SPECS[architecture], seed=7)  # only to write a config.json of the right shapes
    export_model(donor, donor.spec, tmp_path / "config")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "config")
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in hf.parameters():  # transformers' init leaves norms at one and some weights at zero
            param.add_(torch.randn_like(param) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    spec = GPTSpec(**(SPECS[architecture] | {"init_from": str(tmp_path / "hf")}))
    model = build_model(spec).eval()
    load_into(model, spec, tmp_path / "hf")
    ids = torch.randint(0, spec.vocab_size, (2, spec.seq_len), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_init_from_under_expert_parallelism_loads_only_this_ranks_experts(tmp_path):
    whole = ember_model(SPECS["MixtralForCausalLM"], seed=5)
    export_model(whole, whole.spec, tmp_path)
    fields = SPECS["MixtralForCausalLM"] | {"moe": MOE | {"ep_size": 2}}
    spec = GPTSpec(**fields)
    rank1 = build_model(spec, ExpertPlacement(spec.moe.num_experts, ep_size=2, ep_rank=1))
    load_into(rank1, rank1.spec, tmp_path)
    for name in ("w_in", "w_out"):
        ours = getattr(rank1.blocks[0].ffn.moe.experts, name)
        torch.testing.assert_close(ours, getattr(whole.blocks[0].ffn.moe.experts, name)[2:])  # experts 2 and 3


def test_init_from_names_the_field_that_does_not_match(tmp_path):
    model = ember_model(SPECS["LlamaForCausalLM"])
    export_model(model, model.spec, tmp_path)
    wider = GPTSpec(**(LLAMA | {"d_ff": 64}))
    with pytest.raises(UserError, match=r"intermediate_size=48.*64 \(model.d_ff\)"):
        load_into(build_model(wider), wider, tmp_path)
    gpt2 = GPTSpec(**BASE)
    with pytest.raises(UserError, match="LlamaForCausalLM"):
        load_into(build_model(gpt2), gpt2, tmp_path)


@pytest.mark.parametrize(
    ("fields", "option"),
    [
        (BASE | {"position": "rope"}, "model.norm"),
        (BASE | {"n_kv_heads": 2}, "model.n_kv_heads"),
        (LLAMA | {"moe": MOE | {"scoring": "sigmoid"}}, "model.moe.scoring"),
        (LLAMA | {"moe": MOE | {"balance": "bias"}}, "model.moe.balance"),
        (LLAMA | {"moe": MOE | {"every_n_layers": 2}}, "model.moe.every_n_layers"),
        (LLAMA | {"moe": MOE | {"shared_experts": 1}}, "model.moe.shared_expert_gate"),
        (LLAMA | {"bias": True, "moe": MOE}, "model.bias"),
        (LLAMA | {"moe": MOE | {"top_k": 1}}, "model.moe.norm_topk_prob"),
    ],
)
def test_a_model_without_a_transformers_twin_is_refused_naming_the_option(fields, option):
    with pytest.raises(UserError, match=option.replace(".", r"\.")):
        twin_class(GPTSpec(**fields))


def test_gpt2_export_writes_gpt2_names_and_config(tmp_path):
    model = ember_model(BASE)
    export_model(model, model.spec, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert config["n_inner"] == 48
    assert config["activation_function"] == "gelu_new"


def test_cli_export_of_a_model_without_a_twin_exits_2_naming_the_option(tmp_path, capsys):
    from ember.checkpoint.manifest import write_manifest
    from ember.cli import main
    from ember.spec import JobSpec

    spec = JobSpec.from_dict({"name": "no-twin", "model": BASE | {"position": "rope"},
                              "data": {"train": {"urls": "unused.tar"}}})
    checkpoint = tmp_path / "checkpoints" / "step_000001"
    (checkpoint / "engine").mkdir(parents=True)
    (checkpoint / "engine" / "weights.pt").write_bytes(b"never read: the refusal comes first")
    write_manifest(checkpoint, {"step": 1, "world_size": 1, "spec": spec.model_dump(mode="json")})
    with pytest.raises(SystemExit) as exit_info:
        main(["ckpt", "export", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    assert "model.norm" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_ember_run_refuses_a_mismatched_init_from_before_starting_ray(tmp_path, capsys):
    from ember.cli import main

    model = ember_model(SPECS["LlamaForCausalLM"])
    export_model(model, model.spec, tmp_path / "hf")
    spec = {"name": "init-from", "model": LLAMA | {"n_layers": 3, "init_from": str(tmp_path / "hf")},
            "data": {"train": {"urls": str(tmp_path / "hf" / "config.json")}}}  # any existing file: no build
    (tmp_path / "job.yaml").write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tmp_path / "job.yaml")])
    assert exit_info.value.code == 2
    assert "num_hidden_layers=2" in capsys.readouterr().err
