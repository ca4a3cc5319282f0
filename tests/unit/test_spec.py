"""Job spec: valid examples load, each kind of mistake names its field, mutations never crash."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.errors import UserError
from ember.spec import JobSpec

REPO = Path(__file__).resolve().parents[2]
JOB_FILES = sorted((REPO / "jobs").rglob("*.yaml"))


def base_spec() -> dict:
    return yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_job_file_validates(path: Path) -> None:
    spec = JobSpec.load(path)
    assert spec.name


def test_defaults_and_derived_batch_arithmetic() -> None:
    spec = JobSpec.load(REPO / "jobs" / "quickstart.yaml")
    assert spec.grad_accumulation == 1
    assert spec.global_batch == 32
    accumulated = JobSpec.load(REPO / "jobs" / "quickstart.yaml", ["schedule.global_batch=128"])
    assert accumulated.grad_accumulation == 4
    assert accumulated.optim.betas == (0.9, 0.95)  # a default filled in


def test_input_paths_resolve_against_the_spec_folder() -> None:
    spec = JobSpec.load(REPO / "jobs" / "quickstart.yaml")
    assert spec.data.train.urls == str(REPO / "jobs" / "../data/stdlib-text/train-{000000..000007}.tar")
    remote = JobSpec.load(REPO / "jobs" / "quickstart.yaml", ["data.train.urls=https://example.org/a-{0..3}.tar"])
    assert remote.data.train.urls == "https://example.org/a-{0..3}.tar"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["engine.zero_stage=7"], "engine.zero_stage"),
        (["engine.zero_stage=three"], "engine.zero_stage"),
        (["engine.kind=megatron"], "engine"),
        (["model.d_model=102"], "n_heads=4 must divide d_model=102"),
        (["model.moe.ep_size=3"], "ep_size"),
        (["model.moe.num_experts=6", "model.moe.ep_size=4", "cluster.num_workers=4"], "ep_size=4 must divide"),
        (["model.moe.experts_per_layer=[4, 4, 8]"], "moe.experts_per_layer has 3 entries; the model has 2 MoE"),
        (["model.moe.experts_per_layer=[4, 5]"], "ep_size=2 must divide experts_per_layer=5"),
        (["model.moe.impl=deepspeed", "model.moe.noisy_gating=true"], "need impl: ember"),
        (["model.moe.impl=deepspeed", "model.moe.routing=expert_choice"], "need impl: ember"),
        (["engine.zero_stage=3"], "zero_stage=3 is not supported"),
        (["schedule.global_batch=40"], "schedule.global_batch=40"),
        (["optim.lrr=0.1"], "optim.lrr: unknown field"),
        (["engine={kind: ddp}", "model.moe.impl=deepspeed"], "needs engine.kind=deepspeed, or ddp with"),
        (["engine={kind: fsdp}"], "needs engine.kind=deepspeed"),
        (["engine={kind: fairscale, mode: fsdp}", "cluster.device=cpu", "model.moe=null"], "fairscale's FSDP"),
        (["cluster.address=tcp://x"], "cluster.address"),
        (["name="], "name"),
    ],
)
def test_mistakes_name_the_field(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserError) as caught:
        JobSpec.load(REPO / "jobs" / "quickstart.yaml", overrides)
    assert needle in str(caught.value)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml: line \d+: not valid YAML"):
        JobSpec.load(bad)
    with pytest.raises(UserError, match="spec file not found"):
        JobSpec.load(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(UserError, match="YAML mapping"):
        JobSpec.load(scalar)


def test_bad_set_path() -> None:
    with pytest.raises(UserError, match="model.d_model is a value"):
        JobSpec.load(REPO / "jobs" / "quickstart.yaml", ["model.d_model.width=3"])
    with pytest.raises(UserError, match="expected dotted.path=value"):
        JobSpec.load(REPO / "jobs" / "quickstart.yaml", ["engine.zero_stage"])


# --- mutations: any edit of a valid spec gives a valid spec or a UserError, never another exception ---

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def paths_of(tree: dict, prefix: tuple = ()) -> list[tuple]:
    found = []
    for key, value in tree.items():
        found.append(prefix + (key,))
        if isinstance(value, dict):
            found.extend(paths_of(value, prefix + (key,)))
    return found


@st.composite
def mutated_specs(draw) -> dict:
    spec = base_spec()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths_of(spec)))
        node = spec
        for key in path[:-1]:
            node = node[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[path[-1]] = draw(SCALARS)
        elif action == "delete":
            node.pop(path[-1], None)
        else:
            node[draw(st.text(min_size=1, max_size=8))] = draw(SCALARS)
    return spec


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_specs())
def test_mutated_specs_validate_or_raise_user_error(raw: dict) -> None:
    try:
        spec = JobSpec.from_dict(copy.deepcopy(raw))
    except UserError as err:
        assert str(err).strip()
        return
    assert spec.global_batch % spec.schedule.micro_batch == 0
