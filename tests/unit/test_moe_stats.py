"""Routing observability: the stats a MoE GPT's layers keep reach TensorBoard and `ember moe-stats` reads them back."""

from __future__ import annotations

import json

import pytest
import torch

from ember.models import build_model
from ember.observe.moe_stats import log_routing, moe_stats_table, routing_stats
from ember.observe.tensorboard import TensorBoardLogger
from ember.spec.model import GPTSpec
from tests.unit.test_cli import run_cli


def moe_gpt():
    spec = GPTSpec.model_validate({"d_model": 16, "n_heads": 2, "n_layers": 4, "seq_len": 8, "moe": {
        "num_experts": 4, "top_k": 2, "capacity_factor": 0.5, "min_capacity": 0, "impl": "ember"}})
    return build_model(spec, seed=0)


@pytest.fixture
def logged(tmp_path):
    model = moe_gpt()
    model(torch.randint(0, 256, (4, 8)))
    stats = routing_stats(model)
    logger = TensorBoardLogger(tmp_path / "tensorboard", enabled=True)
    log_routing(logger, 10, {layer: {k: v * 0 for k, v in values.items()} for layer, values in stats.items()})
    log_routing(logger, 20, stats)  # the table must show the latest step
    logger.close()
    return tmp_path, stats


def test_every_moe_block_reports_its_routing():
    model = moe_gpt()
    model(torch.randint(0, 256, (4, 8)))
    stats = routing_stats(model)
    assert sorted(stats) == [1, 3]  # every_n_layers=2: blocks 1 and 3
    for values in stats.values():
        assert values["expert_fraction"].shape == (4,)
        assert values["dropped_fraction"] > 0


def test_moe_stats_reads_back_the_latest_step(logged):
    run_dir, stats = logged
    step, rows = moe_stats_table(run_dir)
    assert step == 20
    assert [row["layer"] for row in rows] == [1, 3]
    for row in rows:
        load = stats[row["layer"]]["expert_fraction"]
        assert row["max_load"] == pytest.approx(float(load.max() * 4), rel=1e-5)
        assert row["dropped"] == pytest.approx(float(stats[row["layer"]]["dropped_fraction"]), rel=1e-5)
        assert row["hottest"][0] == int(torch.argmax(load))


def test_moe_stats_command_prints_the_table_and_json(logged, capsys):
    run_dir, _ = logged
    code, out, _ = run_cli(["moe-stats", str(run_dir)], capsys)
    assert code == 0
    assert "step 20" in out
    assert "max_load" in out
    code, out, _ = run_cli(["moe-stats", str(run_dir), "--json"], capsys)
    assert code == 0
    assert [row["layer"] for row in json.loads(out)["layers"]] == [1, 3]


def test_moe_stats_on_a_run_without_routing_logs_is_a_user_error(tmp_path, capsys):
    code, _, err = run_cli(["moe-stats", str(tmp_path)], capsys)
    assert code == 2
    assert "tensorboard" in err
