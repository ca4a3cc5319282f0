"""Image shards from scikit-learn's digits and photos: the build, the image and image-token decodes checked
against load_digits itself, `ember data inspect`, and the spec checks of a decode against its model."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from ember.data.build_images import build_image_shards
from ember.data.formats import ImageBatch, ImageRows, ImageTokenRows, dequantise
from ember.data.loader import build_stream, row_format
from ember.data.stream import ShardStream
from ember.errors import UserError
from ember.spec.data import DataSpec
from ember.spec.model import GPTSpec
from tests.helpers.cli import run_cli

TRAIN_SHARDS = 15


def digit_urls(folder: Path) -> str:
    return f"{folder}/train-{{000000..{TRAIN_SHARDS - 1:06d}}}.tar"


def members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def keys_of(path: Path) -> list[str]:
    return sorted({name.split(".")[0] for name in members(path)})


def test_digits_build_writes_every_digit_once_with_a_stratified_297_val_split(digit_shards: Path) -> None:
    index = json.loads((digit_shards / "shards.json").read_text())
    assert index["kind"] == "images"
    assert index["image_size"] == 8
    assert index["channels"] == 1
    names = [shard["name"] for shard in index["shards"]]
    assert names == [f"train-{i:06d}.tar" for i in range(TRAIN_SHARDS)] + ["val-000000.tar"]
    for shard in index["shards"]:
        data = (digit_shards / shard["name"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["bytes"] == len(data)
        assert shard["samples"] == len(keys_of(digit_shards / shard["name"]))
    train = [key for name in names[:-1] for key in keys_of(digit_shards / name)]
    val = keys_of(digit_shards / "val-000000.tar")
    assert len(val) == 297
    assert len(train) == 1500
    assert sorted(train + val) == [f"digit-{i:04d}" for i in range(1797)]
    labels = load_digits().target
    val_counts = np.bincount([labels[int(key[len("digit-") :])] for key in val], minlength=10)
    assert abs(val_counts / val_counts.sum() - np.bincount(labels) / len(labels)).max() < 0.005  # stratified


def test_image_build_is_reproducible_byte_for_byte(digit_shards: Path, tmp_path: Path) -> None:
    again = build_image_shards(tmp_path / "again", "digits", shard_size=100)
    first = json.loads((digit_shards / "shards.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]


def test_photo_patches_are_rgb_without_labels(photo_shards: Path) -> None:
    index = json.loads((photo_shards / "shards.json").read_text())
    assert index["source"] == "sample-images"
    assert index["channels"] == 3
    assert index["image_size"] == 8
    assert sum(s["samples"] for s in index["shards"]) == 2 * 23 * 37  # 64-px patches at stride 16 of 427x640
    names = members(photo_shards / "train-000000.tar")
    assert all(name.endswith(".png") for name in names)
    stream = ShardStream(str(photo_shards / "train-000000.tar"), micro_batch=5, rank=0, world_size=1, rows=ImageRows())
    batch = stream.next_batch()
    assert batch.images.shape == (5, 3, 8, 8)
    assert batch.labels.tolist() == [-1] * 5


def test_image_batches_are_floats_in_range_with_the_shards_labels(digit_shards: Path) -> None:
    stream = ShardStream(digit_urls(digit_shards), micro_batch=16, rank=0, world_size=1, rows=ImageRows())
    batch = stream.next_batch()
    assert isinstance(batch, ImageBatch)
    assert len(batch) == 16
    assert batch.images.dtype == torch.float32
    assert batch.images.shape == (16, 1, 8, 8)
    assert batch.images.min() >= -1
    assert batch.images.max() <= 1
    assert batch.images.max() == 1
    digits = load_digits()
    for sample_id, label, image in zip(batch.ids, batch.labels, batch.images, strict=True):
        index = int(sample_id.key[len("digit-") :])
        assert label == digits.target[index]
        assert sample_id.epoch == 0
        assert torch.allclose((image[0] + 1) * 8, torch.from_numpy(digits.images[index]).float(), atol=0.04)


def test_image_tokens_are_the_class_then_the_digits_own_grey_levels(digit_shards: Path) -> None:
    rows = ImageTokenRows(seq_len=64)
    stream = ShardStream(digit_urls(digit_shards), micro_batch=8, rank=0, world_size=1, rows=rows)
    reference = ShardStream(digit_urls(digit_shards), micro_batch=8, rank=0, world_size=1, rows=ImageRows())
    tokens, images = stream.next_batch(), reference.next_batch()
    assert tokens.dtype == torch.long
    assert tokens.shape == (8, 65)
    digits = load_digits()
    for row, sample_id in zip(tokens, images.ids, strict=True):
        index = int(sample_id.key[len("digit-") :])
        assert row[0] == 17 + digits.target[index]
        assert row[1:].tolist() == digits.images[index].astype(int).ravel().tolist()  # 17 levels, exact
    assert dequantise(tokens[0, 1:].numpy(), 17).max() == 255


def test_image_tokens_refuse_a_context_that_is_not_the_image(digit_shards: Path) -> None:
    stream = ShardStream(digit_urls(digit_shards), micro_batch=2, rank=0, world_size=1, rows=ImageTokenRows(63))
    with pytest.raises(UserError, match="model.seq_len must be 64"):
        stream.next_batch()


@pytest.mark.parametrize(
    ("decode", "model", "needle"),
    [
        ("image", {"seq_len": 64}, "data.decode=image_tokens"),
        ("image_tokens", {"seq_len": 64, "vocab_size": 20}, "model.vocab_size >= 28"),
    ],
)
def test_a_decode_the_model_cannot_read_is_a_user_error(decode: str, model: dict, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        row_format(DataSpec(train={"urls": "x.tar"}, decode=decode), GPTSpec(**model))


def test_build_stream_picks_the_decode_from_the_spec(digit_shards: Path) -> None:
    data = DataSpec(train={"urls": digit_urls(digit_shards)}, decode="image_tokens")
    batch = next(build_stream(data, GPTSpec(seq_len=64, vocab_size=28), micro_batch=4, rank=0, world_size=1))
    assert batch.shape == (4, 65)


def cli_text(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code, out, err = run_cli(args, capsys)
    return code, out + err


def test_cli_builds_images_and_inspect_prints_counts_keys_and_a_grid(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "digits16"
    code, text = cli_text(
        [
            "data",
            "build",
            "images",
            "--source",
            "digits",
            "--out",
            str(out),
            "--shard-size",
            "600",
            "--image-size",
            "16",
        ],
        capsys,
    )
    assert code == 0
    assert "wrote 4 shards (1797 samples)" in text
    grid = tmp_path / "grid.png"
    code, text = cli_text(["data", "inspect", str(out), "--grid", str(grid), "--keys", "3"], capsys)
    assert code == 0
    assert "images from digits, 16x16x1; 4 shards, 1797 samples" in text
    assert "train-000002.tar" in text
    assert "val-000000.tar" in text
    assert "297 samples" in text
    first = keys_of(out / "train-000000.tar")
    assert sum(key in text for key in first) == 3
    with Image.open(grid) as picture:
        assert picture.mode == "L"  # 64 tiles of 32 px
        assert picture.size == (8 * 33 - 1, 8 * 33 - 1)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["data", "build", "images", "--source", "cifar", "--out", "OUT"], "--source cifar"),
        (["data", "build", "images", "--source", "digits", "--image-size", "12", "--out", "OUT"], "--image-size 12"),
        (["data", "inspect", "OUT"], "no shards.json"),
    ],
)
def test_image_cli_mistakes_exit_2(args: list[str], needle: str, tmp_path: Path, capsys) -> None:
    code, text = cli_text([str(tmp_path) if arg == "OUT" else arg for arg in args], capsys)
    assert code == 2
    assert needle in text
    assert "Traceback" not in text


def test_inspect_grid_of_text_shards_is_refused(tiny_stdlib_shards: Path, tmp_path: Path, capsys) -> None:
    code, text = cli_text(["data", "inspect", str(tiny_stdlib_shards), "--grid", str(tmp_path / "g.png")], capsys)
    assert code == 2
    assert "needs image shards" in text
