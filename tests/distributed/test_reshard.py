"""DeepSpeed checkpoints resume on another world size and EP size, converted at load time.

Three spawns: 2 ranks train every source run and save it (`wide`), 1 rank loads those and trains its own
sources (`narrow`), 2 ranks load the 1-rank sources and the EP-size changes (`regrown`). Every rank
reports the full tensors it holds (weights, fp32 masters, Adam moments; experts by global id), gathered
from the live engine right after the save or the load, and the per-micro-batch CE losses of the next
REPLAY steps. The global batch is the same on every world size (micro x accumulation x world), and each
micro-batch is a pure function of (step, global micro index), so both topologies train the same function.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ember.engines.base import build_engine
from ember.engines.deepspeed.reshard import ExpertLayout, read_full_state, relayout_groups, saved_layout
from ember.errors import UserError
from ember.models import build_model
from ember.spec import JobSpec
from ember.train.objectives.lm import lm_loss, split_batch
from ember.world import world_from_env
from tests.distributed.test_engines import corpus, quiet_rank
from tests.helpers.distributed import run_on_ranks

pytestmark = pytest.mark.distributed

MICRO_BATCH, MICROS_PER_STEP, SEQ_LEN, NUM_EXPERTS = 4, 4, 32, 4  # MICROS_PER_STEP = accumulation x world
SAVE_AT, REPLAY = 3, 3
EXPERT_NAME = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..+)$")
# Measured: the resumed run's CE losses are within 4e-7 (relative; 1-4 float32 ulps at loss ~5) of the run
# that kept its world size: sums run in another order (one rank accumulates four micro-batches where two
# accumulate two each and reduce; experts see other batch shapes). 2e-6 leaves 5x headroom; restoring
# zero moments instead of the saved ones moves the losses by 1.7e-2.
LOSS_RTOL = 2e-6
STACKED = re.compile(r"^(.*\.)experts\.(w_in|b_in|w_out|b_out)$")  # ember's experts: [E_local, ...] per rank
LINEAR = {"w_in": "fc.weight", "b_in": "fc.bias", "w_out": "proj.weight", "b_out": "proj.bias"}
BF16_LOSS_RTOL = 2e-4  # bf16 weights and gradients: measured 2.3e-5


@dataclass(frozen=True)
class Run:
    name: str
    world_size: int
    zero_stage: int
    ep_size: int | None = None  # None: dense
    precision: str = "fp32"
    impl: str = "deepspeed"  # MoE layer: DeepSpeed's (one tensor per expert) or ember's (stacked experts)

    def spec(self) -> JobSpec:
        moe = None
        if self.ep_size is not None:
            moe = {"num_experts": NUM_EXPERTS, "top_k": 1, "every_n_layers": 2, "ep_size": self.ep_size,
                   "drop_tokens": False, "impl": self.impl}  # dropless: every EP size routes every token
        return JobSpec.from_dict({
            "name": f"reshard-{self.name}",
            "model": {"d_model": 32, "n_heads": 4, "n_layers": 2, "seq_len": SEQ_LEN, "moe": moe},
            "data": {"train": {"urls": "unused-the-test-feeds-batches"}},
            "engine": {"kind": "deepspeed", "zero_stage": self.zero_stage, "precision": self.precision,
                       "grad_clip": 1.0},
            "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1, "warmup_steps": 2, "schedule": "cosine"},
            "schedule": {"steps": 20, "micro_batch": MICRO_BATCH, "global_batch": MICRO_BATCH * MICROS_PER_STEP},
            "cluster": {"num_workers": self.world_size, "device": "cpu"},
        })

    def moved(self, world_size: int, ep_size: int | None = None) -> Run:
        name = f"{self.name}-to-w{world_size}" + (f"-ep{ep_size}" if ep_size else "")
        return Run(name, world_size, self.zero_stage, ep_size, self.precision, self.impl)


ZERO1_W2, ZERO2_W2, ZERO0_W2 = Run("zero1-w2", 2, 1), Run("zero2-w2", 2, 2), Run("zero0-w2", 2, 0)
MOE2_W2_EP2, MOE0_W2_EP2 = Run("moe-zero2-w2-ep2", 2, 2, 2), Run("moe-zero0-w2-ep2", 2, 0, 2)
MOE2_W2_EP1 = Run("moe-zero2-w2-ep1", 2, 2, 1)  # expert shards split over 2 expert-data-parallel ranks
BF16_ZERO2_W2 = Run("bf16-zero2-w2", 2, 2, precision="bf16")
EMBER2_W2_EP2, EMBER0_W2_EP2 = Run("ember-zero2-w2-ep2", 2, 2, 2, impl="ember"), Run("ember-zero0-w2-ep2", 2, 0, 2,
                                                                                      impl="ember")
ZERO1_W1, ZERO2_W1, MOE2_W1_EP1 = Run("zero1-w1", 1, 1), Run("zero2-w1", 1, 2), Run("moe-zero2-w1-ep1", 1, 2, 1)
# trained and saved on 2 ranks, on 1 rank
WIDE = [ZERO1_W2, ZERO2_W2, ZERO0_W2, MOE2_W2_EP2, MOE2_W2_EP1, MOE0_W2_EP2, BF16_ZERO2_W2, EMBER2_W2_EP2,
        EMBER0_W2_EP2]
NARROW = [ZERO1_W1, ZERO2_W1, MOE2_W1_EP1]
# (saved run, resumed run) for the two resume spawns
TO_NARROW = [(run, run.moved(1, run.ep_size and 1)) for run in WIDE
             if run not in (MOE2_W2_EP1, MOE0_W2_EP2, EMBER0_W2_EP2)]
TO_REGROWN = [(run, run.moved(2, run.ep_size and 2)) for run in NARROW] + [
    (MOE2_W2_EP2, MOE2_W2_EP2.moved(2, 1)),  # same world size, ep_size 2 -> 1
    (MOE2_W2_EP1, MOE2_W2_EP1.moved(2, 2)),  # and 1 -> 2
    (MOE0_W2_EP2, MOE0_W2_EP2.moved(2, 1)),
    (EMBER2_W2_EP2, EMBER2_W2_EP2.moved(2, 1)),
    (EMBER0_W2_EP2, EMBER0_W2_EP2.moved(2, 1)),
]


# ---- what every rank runs -------------------------------------------------------------------------


def build(run: Run):
    spec = run.spec()
    world = world_from_env("cpu", ep_size=run.ep_size or 1)
    torch.manual_seed(0)
    return spec, world, build_engine(spec, build_model(spec.model, world.expert_placement(spec.model), seed=0), world)


def micro_batch(tokens: torch.Tensor, step: int, index: int) -> torch.Tensor:
    """[micro_batch, seq_len + 1] windows, a pure function of (step, global micro-batch index)."""
    generator = torch.Generator().manual_seed(7_919 * step + index)
    starts = torch.randint(0, len(tokens) - SEQ_LEN - 1, (MICRO_BATCH,), generator=generator).tolist()
    return torch.stack([tokens[start : start + SEQ_LEN + 1] for start in starts])


def train(engine, spec: JobSpec, rank: int, steps: range, tokens: torch.Tensor) -> dict[tuple[int, int], float]:
    """(step, global micro index) -> CE loss; the aux loss trains but is left out of the record."""
    losses, accumulation = {}, spec.grad_accumulation
    aux_weight = spec.model.moe.aux_loss_weight if spec.model.moe else 0.0
    for step in steps:
        for micro in range(accumulation):
            index = rank * accumulation + micro
            inputs, targets = split_batch(micro_batch(tokens, step, index))
            loss, parts = lm_loss(engine.forward(inputs), targets, aux_weight)
            engine.backward(loss)
            losses[step, index] = float(parts["ce"])
        engine.step()
    return losses


def full_tensors(engine, world) -> dict[str, dict[str, torch.Tensor]]:
    """Global name -> weight, master, exp_avg, exp_avg_sq, step: gathered from the live engine (not the files)."""
    ds = engine.ds
    weights = {global_name(name, world): value.clone() for name, value in ds.module.state_dict().items()}
    result = {name: {"weight": value} for name, value in weights.items()}
    optimizer = ds.optimizer
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        for index, params in enumerate(optimizer.bit16_groups):
            flat = optimizer.single_partition_of_fp32_groups[index]
            state = optimizer.optimizer.state[flat]
            for param in params:
                gathered = gather_partitioned(param, {"master": flat, **state})
                for name, entry in per_expert(ds.param_names[param], gathered, world).items():
                    result[name].update(entry)
    else:
        for group in optimizer.param_groups:
            for param in group["params"]:
                state = {"master": param.detach().clone(), **{k: v.clone() for k, v in optimizer.state[param].items()}}
                for name, entry in per_expert(ds.param_names[param], state, world).items():
                    result[name].update(entry)
    result["lr"] = {"lr": torch.tensor([group["lr"] for group in optimizer.param_groups], dtype=torch.float64)}
    return result


def gather_partitioned(param, flats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSpeed's safe_get_full_optimizer_state, also for groups it leaves unlinked (all but the first)."""
    gathered = {}
    for key, flat in flats.items():
        if flat.dim() == 0:
            gathered[key] = flat.clone()
            continue
        buffer = torch.zeros(param.numel(), dtype=flat.dtype)
        mapping = param._hp_mapping
        if mapping is not None:
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            buffer.narrow(0, lp.start, lp.numel).copy_(flat.narrow(0, hp.start, hp.numel))
        dist.all_reduce(buffer, group=param._dp_group)  # fragments are disjoint: the sum is the whole
        gathered[key] = buffer.view_as(param)
    return gathered


def per_expert(name: str, tensors: dict[str, torch.Tensor], world) -> dict[str, dict[str, torch.Tensor]]:
    """Global name -> tensors; ember's stacked expert tensors cut into the per-expert names its files use."""
    match = STACKED.match(name)
    if match is None:
        return {global_name(name, world): tensors}
    kind, per_rank = match.group(2), NUM_EXPERTS // world.ep_size
    prefix = f"{match.group(1)}deepspeed_moe.experts.deepspeed_experts."
    result = {}
    for local in range(per_rank):
        result[f"{prefix}{world.ep_rank * per_rank + local}.{LINEAR[kind]}"] = {
            key: stacked_piece(value, kind, local, per_rank) for key, value in tensors.items()}
    return result


def stacked_piece(value: torch.Tensor, kind: str, local: int, per_rank: int) -> torch.Tensor:
    """Expert `local` of a stacked tensor, in nn.Linear layout (weights [out, in], biases flat)."""
    if value.dim() == 0:
        return value
    return value[local].t() if kind.startswith("w") else value.view(per_rank, -1)[local]


def global_name(name: str, world) -> str:
    match = EXPERT_NAME.match(name)
    if match is None:
        return name.replace(".router.gate.weight", ".deepspeed_moe.gate.wg.weight")  # ember's router, as saved
    per_rank = NUM_EXPERTS // world.ep_size
    return f"{match.group(1)}{world.ep_rank * per_rank + int(match.group(2))}{match.group(3)}"


def train_and_save(rank: int, world_size: int, runs: list[Run], folder: str) -> dict[str, Any]:
    tokens, results = corpus(), {}
    for run in runs:
        spec, world, engine = build(run)
        train(engine, spec, rank, range(SAVE_AT), tokens)
        engine.save(Path(folder) / run.name)
        results[run.name] = {"full": full_tensors(engine, world),
                             "losses": train(engine, spec, rank, range(SAVE_AT, SAVE_AT + REPLAY), tokens)}
        world.barrier()
    return results


def load_and_replay(rank: int, world_size: int, moves: list[tuple[Run, Run]], folder: str) -> dict[str, Any]:
    tokens, results = corpus(), {}
    for source, target in moves:
        spec, world, engine = build(target)
        assert engine.reshards_on_load
        engine.load(Path(folder) / source.name)
        results[target.name] = {"full": full_tensors(engine, world),
                                "losses": train(engine, spec, rank, range(SAVE_AT, SAVE_AT + REPLAY), tokens)}
        world.barrier()
    return results


def narrow_rank(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    quiet_rank()
    results = load_and_replay(rank, world_size, TO_NARROW, folder)
    results.update(train_and_save(rank, world_size, NARROW, folder))
    _, _, zero3 = build(Run("zero3-w1", 1, 3))
    results["zero3 reshards_on_load"] = zero3.reshards_on_load
    results["zero3 reshard_refusal"] = zero3.reshard_refusal
    return results


def wide_rank(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    quiet_rank()
    return train_and_save(rank, world_size, WIDE, folder)


def regrown_rank(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    quiet_rank()
    return load_and_replay(rank, world_size, TO_REGROWN, folder)


# ---- fixtures: one spawn each ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reshard-checkpoints")


@pytest.fixture(scope="module")
def wide(folder) -> list[dict[str, Any]]:
    return run_on_ranks(wide_rank, 2, str(folder))


@pytest.fixture(scope="module")
def narrow(wide, folder) -> list[dict[str, Any]]:
    return run_on_ranks(narrow_rank, 1, str(folder))


@pytest.fixture(scope="module")
def regrown(narrow, folder) -> list[dict[str, Any]]:
    return run_on_ranks(regrown_rank, 2, str(folder))


def merged(results: list[dict[str, Any]], name: str) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """Full tensors over all ranks (replicas must agree) and CE losses as [step, global micro index]."""
    full: dict[str, dict[str, torch.Tensor]] = {}
    losses = torch.full((REPLAY, MICROS_PER_STEP), float("nan"), dtype=torch.float64)
    for rank_result in results:
        for key, entry in rank_result[name]["full"].items():
            if key in full:
                assert all(torch.equal(full[key][k], entry[k]) for k in entry), f"{name} {key}: replicas differ"
            full[key] = entry
        for (step, index), value in rank_result[name]["losses"].items():
            losses[step - SAVE_AT, index] = value
    assert not losses.isnan().any(), f"{name}: some micro-batches were not trained"
    return full, losses


def assert_resumed_exactly(saved_by: list, resumed_by: list, source: Run, target: Run) -> None:
    saved, continued = merged(saved_by, source.name)
    loaded, replayed = merged(resumed_by, target.name)
    assert sorted(loaded) == sorted(saved), f"{target.name}: other names than saved"
    for name, entry in saved.items():
        assert sorted(loaded[name]) == sorted(entry), f"{target.name} {name}: {sorted(loaded[name])}"
        for key, value in entry.items():
            assert torch.equal(loaded[name][key], value), f"{target.name} {name} {key} differs from the saved one"
    rtol = BF16_LOSS_RTOL if target.precision == "bf16" else LOSS_RTOL
    torch.testing.assert_close(replayed, continued, rtol=rtol, atol=0, msg=lambda m: f"{target.name}: {m}")


# ---- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "target"), TO_NARROW, ids=[target.name for _, target in TO_NARROW])
def test_two_ranks_resume_on_one_with_every_tensor_bitwise(wide, narrow, source, target):
    assert_resumed_exactly(wide, narrow, source, target)


@pytest.mark.parametrize(("source", "target"), TO_REGROWN, ids=[target.name for _, target in TO_REGROWN])
def test_resume_on_more_ranks_or_another_ep_size_with_every_tensor_bitwise(wide, narrow, regrown, source, target):
    assert_resumed_exactly(narrow if source.world_size == 1 else wide, regrown, source, target)


def test_zero3_says_it_cannot_reshard(narrow):
    assert narrow[0]["zero3 reshards_on_load"] is False
    assert "ZeRO-3 checkpoints are not resharded" in narrow[0]["zero3 reshard_refusal"]  # the resume error says why


# ---- refusals: files only, no process group --------------------------------------------------------

EXPERTS = ExpertLayout({"blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.": NUM_EXPERTS})


def test_optimizer_shards_from_the_wrong_ep_rank_are_refused(wide, folder, tmp_path):
    """Swap the expert partitions of the two EP ranks: the weights name each expert, the shards disagree."""
    engine_dir = shutil.copytree(folder / "moe-zero2-w2-ep2", tmp_path / "engine")
    paths = [engine_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]
    states = [torch.load(path, weights_only=False) for path in paths]
    optimizers = [state["optimizer_state_dict"] for state in states]
    masters = [optimizer["single_partition_of_fp32_groups"] for optimizer in optimizers]
    for index, group in enumerate(optimizers[0]["base_optimizer_state"]["param_groups"]):
        if group.get("moe"):
            masters[0][index], masters[1][index] = masters[1][index], masters[0][index]
    for state, path in zip(states, paths, strict=True):
        torch.save(state, path)
    with pytest.raises(UserError, match="mixed up"):
        read_full_state(engine_dir, saved_layout(engine_dir), EXPERTS)


def test_a_manifest_that_disagrees_with_the_files_is_refused(wide, folder, tmp_path):
    engine_dir = shutil.copytree(folder / "moe-zero2-w2-ep2", tmp_path / "step_000003" / "engine")
    (engine_dir.parent / "manifest.json").write_text('{"world_size": 2, "ep_size": 1}')
    with pytest.raises(UserError, match="ep_size=1"):
        saved_layout(engine_dir)


def test_a_model_with_other_experts_is_refused(wide, folder):
    engine_dir = folder / "moe-zero2-w2-ep2"
    with pytest.raises(UserError, match="experts"):
        read_full_state(engine_dir, saved_layout(engine_dir), ExpertLayout({"other.deepspeed_experts.": 8}))


def test_local_expert_names_become_global_ids_by_ep_rank():
    name = "blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.1.fc.weight"
    assert EXPERTS.to_global(name, ep_size=2, ep_rank=1) == name.replace("experts.1.", "experts.3.")
    assert EXPERTS.to_global(name, ep_size=1, ep_rank=0) == name
    assert EXPERTS.to_global("ln_f.weight", ep_size=2, ep_rank=1) == "ln_f.weight"
    with pytest.raises(UserError, match="local expert 2"):  # EP rank 0 of ep_size 2 holds experts 0 and 1
        EXPERTS.to_global(name.replace("experts.1.", "experts.2."), ep_size=2, ep_rank=0)


def test_zero0_groups_regrow_each_layers_experts_in_module_order():
    prefix = "blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts."
    groups = [["ln_f.weight"], [f"{prefix}{e}.{p}" for e in range(2) for p in ("fc.weight", "proj.weight")]]
    regrown = relayout_groups(groups, EXPERTS, ep_size=1)
    assert regrown[0] == ["ln_f.weight"]
    assert regrown[1] == [f"{prefix}{e}.{p}" for e in range(4) for p in ("fc.weight", "proj.weight")]


@pytest.mark.parametrize("version", ["0.18.9", "0.20.0", "1.0.0"])
def test_a_deepspeed_other_than_the_tested_one_is_refused_before_its_files_are_read(monkeypatch, version):
    """The layout resharding reads is DeepSpeed 0.19's: another version gets a message, not a wrong model."""
    import deepspeed

    from ember.engines.deepspeed.reshard import reshard_problem

    monkeypatch.setattr(deepspeed, "__version__", version)
    problem = reshard_problem(ds=None)  # the version is checked first: no engine is touched
    assert problem is not None
    assert f"this is DeepSpeed {version}" in problem
    assert "deepspeed==0.19.*" in problem
    monkeypatch.setattr(deepspeed, "__version__", "0.19.8")
    with pytest.raises(AttributeError):  # the tested version goes on to look at the engine
        reshard_problem(ds=None)
