"""ember's MoE layer on 2 gloo ranks with ep_size=2: equal to DeepSpeed's MoE layer (outputs and gradients),
trains under DeepSpeed ZeRO-2 like ep_size=1 under ZeRO-0, resumes, and exports to the plain model.

One spawn runs every 2-rank part (starting ranks and importing DeepSpeed is most of the cost).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember.checkpoint.export import export_safetensors, load_exported
from ember.checkpoint.manager import CheckpointManager
from ember.engines.expert_groups import attach_expert_groups
from ember.engines.weights import full_state_dict
from ember.models.layers.moe import EmberMoE
from ember.models.layers.moe.deepspeed_layer import build_deepspeed_moe
from ember.models.layers.moe.layouts import PER_EXPERT, to_per_expert_layout
from ember.spec.model import MoESpec
from ember.train.objectives.lm import split_batch
from ember.world import ExpertPlacement, world_from_env
from tests.distributed.test_engines import LOSS_RTOL, NORM_RTOL, Run, build, corpus, job_spec, quiet_rank, train
from tests.distributed.test_export import exported_logits, text_rows
from tests.helpers.distributed import run_on_ranks
from tests.unit.test_moe_layer import TOLERANCE, run

pytestmark = pytest.mark.distributed

D_MODEL, D_FF, TOKENS, STEPS, SAVE_AT = 16, 32, 64, 6, 3
ORACLE_CASES = [(1, True), (2, True), (2, False)]  # (top_k, drop_tokens)


def moe(ep_size: int) -> dict:
    # Dropless: every token reaches its expert whatever the batch split, so ep_size 1 and 2 train alike.
    return {"num_experts": 4, "top_k": 1, "every_n_layers": 2, "ep_size": ep_size, "drop_tokens": False,
            "impl": "ember"}


EP2 = Run("ember-zero2-ep2", {"kind": "deepspeed", "zero_stage": 2}, moe(2))
EP2_ZERO1 = Run("ember-zero1-ep2", {"kind": "deepspeed", "zero_stage": 1}, moe(2))
EP1 = Run("ember-zero0-ep1", {"kind": "deepspeed", "zero_stage": 0}, moe(1))
DDP_EP2, DDP_EP1 = Run("ember-ddp-ep2", {"kind": "ddp"}, moe(2)), Run("ember-ddp-ep1", {"kind": "ddp"}, moe(1))


# ---- what every rank runs -------------------------------------------------------------------------


def global_weights(spec: MoESpec) -> dict[str, torch.Tensor]:
    """A whole layer's weights in DeepSpeed's layout (expert ids global), the same on every rank."""
    torch.manual_seed(7)
    whole = EmberMoE(D_MODEL, D_FF, spec.model_copy(update={"ep_size": 1}))
    for param in whole.parameters():
        torch.nn.init.normal_(param, std=0.3)
    state = whole.state_dict()
    to_per_expert_layout(state, "", spec.num_experts)
    return state


def local_slice(state: dict[str, torch.Tensor], spec: MoESpec, ep_rank: int) -> dict[str, torch.Tensor]:
    per_rank = spec.num_experts // spec.ep_size
    local = {name: t for name, t in state.items() if "deepspeed_experts" not in name}
    for e in range(per_rank):
        source = PER_EXPERT.format(ep_rank * per_rank + e)
        local.update({name.replace(source, PER_EXPERT.format(e)): t for name, t in state.items() if source in name})
    return local


def oracle(rank: int, top_k: int, drop_tokens: bool) -> dict[str, float]:
    """Per tensor: max |ember - DeepSpeed| / max |DeepSpeed| on this rank."""
    spec = MoESpec(num_experts=4, top_k=top_k, drop_tokens=drop_tokens, ep_size=2, capacity_factor=0.75,
                   min_capacity=0)
    weights = local_slice(global_weights(spec), spec, rank)
    reference = build_deepspeed_moe(D_MODEL, D_FF, spec.model_copy(update={"impl": "deepspeed"}), 0.0)
    world = world_from_env("cpu", ep_size=2)
    placement = ExpertPlacement(spec.num_experts, 2, world.ep_rank)
    ember = EmberMoE(D_MODEL, D_FF, spec.model_copy(update={"impl": "ember"}), placement)
    for layer in (reference, ember):
        layer.load_state_dict(weights, strict=True)
        attach_expert_groups(layer, world)
    torch.manual_seed(100 + rank)  # each rank routes its own tokens, to experts on both ranks
    x = torch.randn(TOKENS, D_MODEL)
    (out_e, aux_e, grads_e), (out_r, aux_r, grads_r) = run(ember, x), run(reference, x)
    errors = {"output": relative_error(out_e, out_r), "aux": relative_error(aux_e, aux_r),
              "dropped": float(ember.last_stats["dropped_fraction"])}
    errors.update({name: relative_error(grads_e[name], grads_r[name]) for name in grads_r})
    return errors


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape
    return float((actual - expected).abs().max() / expected.abs().max())


def train_save_resume(rank: int, folder: Path) -> dict:
    tokens, results = corpus(), {}
    for run_spec in (EP1, EP2_ZERO1, EP2, DDP_EP2):
        spec, world, engine = build(run_spec)
        results[run_spec.name] = train(engine, spec, rank, range(SAVE_AT), tokens)
        if run_spec is DDP_EP2:
            (folder / "ddp-ep2").mkdir(exist_ok=True)
            engine.save(folder / "ddp-ep2")
        if run_spec is EP2:
            facts = {"spec": spec.model_dump(mode="json"), "engine": "deepspeed"}
            CheckpointManager(folder / "checkpoints", world, facts=facts).save(
                SAVE_AT, engine, {"data": {}, "world_size": world.world_size}, {"rng": None}
            )
            engine.module.eval()
            with torch.no_grad():  # the probe test_export uses: experts exchange tokens over the EP group
                results["probe"] = engine.forward(split_batch(text_rows(100_000, 4))[0]).logits
            engine.module.train()
        later = train(engine, spec, rank, range(SAVE_AT, STEPS), tokens)
        for key, values in later.items():
            results[run_spec.name][key] += values
        world.barrier()
    spec, world, engine = build(EP2)
    engine.load(next((folder / "checkpoints").glob("step_*")) / "engine")
    results["resumed"] = train(engine, spec, rank, range(SAVE_AT, STEPS), tokens)
    for run_spec in (DDP_EP2, DDP_EP1):  # DDP's checkpoint holds the experts whole: any EP size loads it
        spec, world, engine = build(run_spec)
        engine.load(folder / "ddp-ep2")
        results[f"{run_spec.name}-resumed"] = train(engine, spec, rank, range(SAVE_AT, STEPS), tokens)
    return results


def every_two_rank_part(rank: int, world_size: int, folder: str) -> dict:
    quiet_rank()
    results = {"oracle": {case: oracle(rank, *case) for case in ORACLE_CASES}}
    results.update(train_save_resume(rank, Path(folder)))
    return results


# ---- tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ember-moe-ep")


@pytest.fixture(scope="module")
def ranks(folder) -> list[dict]:
    return run_on_ranks(every_two_rank_part, 2, str(folder))


@pytest.mark.parametrize("case", ORACLE_CASES, ids=lambda c: f"top{c[0]}-{'capacity' if c[1] else 'dropless'}")
def test_expert_parallel_layer_matches_deepspeed(ranks, case):
    for rank, result in enumerate(ranks):
        errors = dict(result["oracle"][case])
        dropped = errors.pop("dropped")
        assert (dropped > 0) == case[1], (rank, dropped)  # capacity mode really drops tokens
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOLERANCE, (rank, worst, errors)


def per_rank(ranks: list[dict], name: str, key: str) -> torch.Tensor:
    return torch.tensor([result[name][key] for result in ranks], dtype=torch.float64)


@pytest.mark.parametrize("run", [EP2, EP2_ZERO1, DDP_EP2], ids=lambda r: r.name)
def test_ep2_under_zero_1_2_and_ddp_trains_like_ep1_under_zero0(ranks, run):
    for key, rtol in (("loss", LOSS_RTOL), ("grad_norm", NORM_RTOL), ("lr", 0.0)):
        torch.testing.assert_close(per_rank(ranks, run.name, key), per_rank(ranks, EP1.name, key), rtol=rtol, atol=0)
    losses = per_rank(ranks, run.name, "loss").mean(0)
    assert losses[-1] < losses[0], losses.tolist()


def test_resumed_ep2_run_replays_bitwise(ranks):
    for key in ("loss", "grad_norm", "lr"):
        expected = per_rank(ranks, EP2.name, key)[:, SAVE_AT:]
        assert torch.equal(per_rank(ranks, "resumed", key), expected), key


def test_ddp_ep2_checkpoint_resumes_bitwise_and_loads_into_ep1(ranks):
    for key in ("loss", "grad_norm", "lr"):
        expected = per_rank(ranks, DDP_EP2.name, key)[:, SAVE_AT:]
        assert torch.equal(per_rank(ranks, f"{DDP_EP2.name}-resumed", key), expected), key
        rtol = {"loss": LOSS_RTOL, "grad_norm": NORM_RTOL, "lr": 0.0}[key]  # EP=1: other GEMM shapes, fp32 rounding
        torch.testing.assert_close(per_rank(ranks, f"{DDP_EP1.name}-resumed", key), expected, rtol=rtol, atol=0)


def test_deepspeed_writes_one_file_per_global_expert(ranks, folder):
    engine_dir = next((folder / "checkpoints").glob("step_*")) / "engine"
    files = sorted(path.name for path in engine_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert files == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)]
    expert_3 = torch.load(engine_dir / files[3], weights_only=False)
    assert all(".deepspeed_experts.3." in name for name in expert_3)


def test_export_of_ember_ep2_zero2_matches_the_sharded_model(ranks, folder):
    torch.testing.assert_close(ranks[0]["probe"], ranks[1]["probe"], rtol=0, atol=0)
    out = folder / "model.safetensors"
    export_safetensors(folder, out, full_state_dict)
    model, spec = load_exported(out)
    assert spec.model.moe.impl == "ember"
    assert spec.model.moe.ep_size == 2
    assert "blocks.1.ffn.moe.experts.w_in" in model.state_dict()  # ember's stacked layout, all 4 experts
    (plain,) = run_on_ranks(exported_logits, 1, str(out))
    # Same weights, same routing; only GEMM blocking differs (experts see other batch shapes): fp32 rounding.
    torch.testing.assert_close(plain, ranks[0]["probe"], rtol=1e-5, atol=1e-5)


def test_spec_refuses_what_deepspeed_cannot_do():
    with pytest.raises(ValueError, match="impl: ember"):
        MoESpec(impl="deepspeed", z_loss_weight=1e-3)
    assert job_spec(EP2).model.moe.impl == "ember"
