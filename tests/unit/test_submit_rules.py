"""What a cluster on another host can see of a submitted spec (pure rules; the hosts tier runs them for real)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.cluster.jobs import on_this_machine, unreachable_fields, with_shared_dirs
from ember.errors import UserError
from ember.spec import JobSpec
from ember.spec.paths import is_under

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("address", "here"), [("http://127.0.0.1:8265", True), ("http://localhost:8265", True),
                                               ("http://10.213.0.2:8265", False), ("http://head.example:8265", False)])
def test_only_a_loopback_head_sees_this_machines_files(address: str, here: bool) -> None:
    assert on_this_machine(address) is here


def test_shared_means_inside_a_declared_folder_not_a_name_prefix() -> None:
    assert is_under("/shared/shards/train-{000000..000003}.tar", ["/shared"])
    assert is_under("file:///shared/x.tar", ["/shared/"])
    assert is_under("/shared/a/../b", ["/shared"])
    assert not is_under("/shared-not/x.tar", ["/shared"])
    assert not is_under("/shared/../etc", ["/shared"])


def test_every_unreachable_field_is_named_and_shared_or_url_inputs_pass() -> None:
    spec = JobSpec.load(REPO / "jobs/debug/tiny-moe.yaml")
    named = [problem.split(":")[0] for problem in unreachable_fields(spec)]
    assert named == ["run_dir", "data.train.urls", "data.val.urls", "data.build.out"]
    fixed = JobSpec.load(REPO / "jobs/debug/tiny-moe.yaml", [
        "run_dir=/shared/runs/x", "data.build=null", "data.train.urls=https://example.org/train-{0..3}.tar",
        "data.val.urls=/shared/val.tar"])
    assert unreachable_fields(with_shared_dirs(fixed, ["/shared"])) == []


def test_shared_dirs_must_be_absolute() -> None:
    with pytest.raises(UserError, match="cluster.shared_dirs"):
        JobSpec.load(REPO / "jobs/debug/tiny-moe.yaml", ["cluster.shared_dirs=[shared]"])
