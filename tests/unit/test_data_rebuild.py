"""ensure_shards with a shard missing from a built set: it adds only that shard when a fresh build reproduces
the others byte for byte, and refuses, naming the shard, when it would not (a data cursor may point into them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ember.data.build import ensure_shards
from ember.errors import UserError
from ember.spec.data import DataSpec, ImageBuildSpec, ShardSet


def digits_spec(out: Path) -> DataSpec:
    """1500 train digits in 3 shards of 500, built by ensure_shards when missing."""
    return DataSpec(
        train=ShardSet(urls=f"{out}/train-{{000000..000002}}.tar"),
        val=ShardSet(urls=f"{out}/val-000000.tar"),
        build=ImageBuildSpec(kind="images", source="digits", out=str(out), shard_size=500),
        decode="image",
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_missing_shard_is_rebuilt_alone_and_the_others_are_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    spec = digits_spec(out)
    ensure_shards(spec)
    manifest = json.loads((out / "shards.json").read_text())
    kept = {name: (out / name).stat().st_ino for name in ("train-000000.tar", "train-000002.tar", "val-000000.tar")}
    (out / "train-000001.tar").unlink()
    ensure_shards(spec)
    assert {name: (out / name).stat().st_ino for name in kept} == kept  # the same files, not replaced copies
    entry = next(shard for shard in manifest["shards"] if shard["name"] == "train-000001.tar")
    assert sha256(out / "train-000001.tar") == entry["sha256"]
    assert json.loads((out / "shards.json").read_text()) == manifest
    assert not [path.name for path in tmp_path.iterdir() if path.name != "digits"]  # no scratch left behind


def test_a_rebuild_that_would_change_a_present_shard_is_refused_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    spec = digits_spec(out)
    ensure_shards(spec)
    (out / "train-000001.tar").unlink()
    changed = out / "train-000002.tar"
    changed.write_bytes(changed.read_bytes() + bytes(1024))  # still a tar, other bytes: as from another corpus
    before = sha256(changed)
    with pytest.raises(UserError, match=r"would not reproduce train-000002\.tar byte for byte"):
        ensure_shards(spec)
    assert sha256(changed) == before
    assert not (out / "train-000001.tar").exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name != "digits"]
