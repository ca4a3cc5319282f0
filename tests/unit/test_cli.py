"""The CLI maps every user mistake to exit 2 with one message naming the field or file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import shard_overrides
from tests.helpers.cli import run_cli

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "jobs" / "quickstart.yaml")


def test_validate_ok(capsys) -> None:
    code, out, _ = run_cli(["validate", QUICKSTART], capsys)
    assert code == 0
    assert "valid" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["validate", "no/such/spec.yaml"], "spec file not found"),
        (["validate", QUICKSTART, "--set", "engine.zero_stage=9"], "engine.zero_stage"),
        (["validate", QUICKSTART, "--set", "model.moe.top_k=five"], "model.moe.top_k"),
        (
            ["run", QUICKSTART, "--set", "data.train.urls=/nonexistent/x-{0..1}.tar", "--set", "data.build=null"],
            "/nonexistent/x-0.tar",
        ),
        (["validate", QUICKSTART, "--frobnicate"], "No such option"),
        (["validate", QUICKSTART, "--set", "checkpoint.resume=atuo"], "checkpoint.resume: 'atuo'"),
        (["validate", QUICKSTART, "--set", "engine.kind=dpp"], "engine.kind: 'dpp' is not one of"),
        (
            ["validate", QUICKSTART, "--set", "data.train.urls=/nonexistent/x-{0..1}.tar", "--set", "data.build=null"],
            "data.train.urls: 2 shard file(s) not found: /nonexistent/x-0.tar",
        ),
        (["data", "build", "video", "--out", "/tmp/x"], "unknown kind"),
        (["data", "build", "images", "--source", "nope", "--out", "/tmp/x"], "--source nope"),
        (["ckpt", "export", "/nonexistent/run", "--out", "/tmp/x.safetensors"], "/nonexistent/run"),
        (["serve", "/nonexistent/run", "--host", "0.0.0.0"], "needs --token-file"),
    ],
)
def test_user_mistakes_exit_2_with_one_message(args: list[str], needle: str, capsys) -> None:
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert needle in out + err
    assert "Traceback" not in out + err


def test_a_run_dir_that_cannot_be_written_exits_2_naming_it(tmp_path: Path, text_shards: Path, capsys) -> None:
    """A file where the run folder should be (a read-only or full disk fails the same call), before Ray starts."""
    (tmp_path / "taken").write_text("a file, not a folder")
    run_dir = tmp_path / "taken" / "run"
    sets = [f"run_dir={run_dir}", *shard_overrides(text_shards)]
    code, out, err = run_cli(["run", str(REPO / "jobs/debug/tiny-moe.yaml"), *[a for s in sets for a in ("--set", s)]],
                             capsys)  # fmt: skip
    assert code == 2
    assert f"run_dir: cannot write {run_dir}" in out + err
    assert "Traceback" not in out + err


def test_schema_is_json_with_every_section(capsys) -> None:
    code, out, _ = run_cli(["schema"], capsys)
    schema = json.loads(out)
    assert code == 0
    assert {"model", "data", "engine", "optim", "schedule", "checkpoint", "cluster", "logging"} <= set(
        schema["properties"]
    )


def test_show_prints_resolved_spec_and_deepspeed_config(capsys) -> None:
    code, out, _ = run_cli(["show", QUICKSTART, "--set", "schedule.global_batch=64"], capsys)
    assert code == 0
    assert "grad_accumulation=2" in out
    config = json.loads(out.split("# DeepSpeed config:\n", 1)[1])
    assert config["zero_optimization"]["stage"] == 2
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 64


def test_version_comes_from_the_package_metadata(capsys) -> None:
    from importlib.metadata import version

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"ember {version('ember')}"


def test_help_keeps_bracketed_text(capsys) -> None:
    code, out, _ = run_cli(["data", "build", "--help"], capsys)
    assert code == 0
    assert "[text 0.05, images 0.165]" in " ".join(out.split())


def test_help_shows_set_as_repeatable(capsys) -> None:
    code, out, _ = run_cli(["validate", "--help"], capsys)
    assert code == 0
    assert "--set FIELD=VALUE" in out
    assert "repeatable" in out
