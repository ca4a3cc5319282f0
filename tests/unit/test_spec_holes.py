"""Each hole the spec once let through is refused at load, and each message names the full dotted field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.errors import UserError
from ember.spec import JobSpec

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"
DIGITS_GPT = REPO / "jobs" / "image-gpt-digits.yaml"


def load_error(overrides: list[str], path: Path = QUICKSTART) -> str:
    with pytest.raises(UserError) as caught:
        JobSpec.load(path, overrides)
    return str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["checkpoint.resume=atuo"], "checkpoint.resume: 'atuo': use auto, never, a step number"),
        (["checkpoint.resume=true"], "checkpoint.resume: True"),
        (["checkpoint.resume=-3"], "checkpoint.resume: -3"),
        (["data.train.urls=[]"], "data.train.urls: give at least one shard"),
        (["data.val.urls=''"], "data.val.urls: give at least one shard"),
        (["data.decode=image"], "data.decode: image gives float images, a GPT reads tokens"),
        (["engine.config_overrides={zero_optimization: {stage: 3}}"],
         "engine.config_overrides.zero_optimization.stage: set engine.zero_stage instead"),
        (["engine.config_overrides={bf16: {enabled: true}}"], "engine.config_overrides.bf16: set engine.precision"),
        (["engine.config_overrides={train_batch_size: 7}"], "set schedule.global_batch instead"),
    ],
)
def test_spec_holes_are_refused_naming_the_field(overrides: list[str], needle: str) -> None:
    assert needle in load_error(overrides)


def test_zero3_through_config_overrides_on_moe_is_refused_like_the_typed_field() -> None:
    typed = load_error(["engine.zero_stage=3"])
    overridden = load_error(["engine.config_overrides={zero_optimization: {stage: 3}}"])
    assert "zero_stage=3 is not supported" in typed
    assert "engine.zero_stage" in overridden


def test_resume_accepts_auto_never_a_step_or_a_path() -> None:
    assert JobSpec.load(QUICKSTART, ["checkpoint.resume=never"]).checkpoint.resume == "never"
    step = JobSpec.load(QUICKSTART, ["checkpoint.resume=200"])
    assert step.checkpoint.resume_folder(Path("/r/checkpoints")) == Path("/r/checkpoints/step_000200")
    relative = JobSpec.load(QUICKSTART, ["checkpoint.resume=old/step_000010"])
    assert relative.checkpoint.resume == str(QUICKSTART.parent / "old/step_000010")  # like every input path


def test_a_gpt_reads_image_tokens_not_float_images() -> None:
    spec = JobSpec.load(DIGITS_GPT)
    assert spec.data.decode == "image_tokens"
    assert "data.decode: image" in load_error(["data.decode=image"], DIGITS_GPT)


def test_overrides_of_keys_no_typed_field_owns_still_merge() -> None:
    spec = JobSpec.load(QUICKSTART, ["engine.config_overrides={zero_optimization: {reduce_bucket_size: 5}}"])
    assert spec.engine.config_overrides == {"zero_optimization": {"reduce_bucket_size": 5}}


@pytest.mark.parametrize(
    ("overrides", "field", "needles"),
    [
        (["engine.kind=deepspped"], "engine.kind", ["'deepspped' is not one of: deepspeed, ddp, fsdp, fairscale",
                                                    "did you mean deepspeed?"]),
        (["model.family=gtp"], "model.family", ["'gtp' is not one of: gpt, diffusion, gan", "did you mean gpt?"]),
        (["data.build.kind=imgaes"], "data.build.kind", ["is not one of: text, images", "did you mean images?"]),
        (["optim.lrr=0.1"], "optim.lrr", ["unknown field; did you mean lr?"]),
        (["engine.zero_stag=1"], "engine.zero_stag", ["did you mean zero_stage?"]),
        (["data.sources=[{urls: a.tar, wieght: 2}]", "data.train=null"], "data.sources.0.wieght",
         ["did you mean weight?"]),
        (["engine.zero_stage=7"], "engine.zero_stage", ["less than or equal to 3"]),
    ],
)
def test_messages_name_the_dotted_field_and_the_allowed_values(
    overrides: list[str], field: str, needles: list[str]
) -> None:
    message = load_error(overrides)
    assert f"  {field}: " in message
    for needle in needles:
        assert needle in message
    assert "()" not in message  # never an internal function name such as _family()
    assert "Input tag" not in message


def test_engine_without_kind_is_the_default_kind() -> None:
    spec = JobSpec.load(QUICKSTART, ["engine={precision: bf16}"])
    assert spec.engine.kind == "deepspeed"
    assert spec.engine.precision == "bf16"


def shard_folder(tmp_path: Path, names: list[str]) -> Path:
    for name in names:
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_missing_local_shards_are_refused_naming_field_and_path(tmp_path: Path) -> None:
    folder = shard_folder(tmp_path, ["train-0.tar"])
    spec = JobSpec.load(QUICKSTART, [f"data.train.urls={folder}/train-{{0..1}}.tar", f"data.val.urls={folder}/v.tar",
                                     "data.build=null"])
    with pytest.raises(UserError) as caught:
        spec.check_local_inputs()
    lines = str(caught.value).splitlines()
    assert lines[0].startswith(f"data.train.urls: 1 shard file(s) not found: {folder}/train-1.tar;")
    assert lines[1].startswith(f"data.val.urls: 1 shard file(s) not found: {folder}/v.tar;")


def test_present_shards_urls_builds_and_remote_clusters_pass_the_local_check(tmp_path: Path) -> None:
    folder = shard_folder(tmp_path, ["train-0.tar", "v.tar"])
    present = [f"data.train.urls={folder}/train-0.tar", f"data.val.urls={folder}/v.tar", "data.build=null"]
    JobSpec.load(QUICKSTART, present).check_local_inputs()
    remote = ["data.train.urls=https://example.org/a-{0..3}.tar", "data.val=null", "data.build=null"]
    JobSpec.load(QUICKSTART, remote).check_local_inputs()
    missing = ["data.train.urls=/nowhere/a-{0..3}.tar", "data.val=null", "data.build=null"]
    JobSpec.load(QUICKSTART, [*missing, "cluster.address=auto"]).check_local_inputs()  # the cluster's own paths
    built_on_run = JobSpec.load(QUICKSTART, [f"data.train.urls={folder}/none-{{0..3}}.tar"])
    assert built_on_run.data.build is not None
    built_on_run.check_local_inputs()


def test_a_missing_resume_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"checkpoint.resume: .*step_000007 is not a committed checkpoint"):
        JobSpec.load(QUICKSTART, ["checkpoint.resume=7", f"run_dir={tmp_path}"]).check_local_inputs()
    saved = tmp_path / "checkpoints" / "step_000007"
    saved.mkdir(parents=True)
    (saved / "manifest.json").write_text(json.dumps({}))
    JobSpec.load(QUICKSTART, ["checkpoint.resume=7", f"run_dir={tmp_path}"]).check_local_inputs()
