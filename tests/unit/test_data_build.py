"""Shard building from the real stdlib, URL expansion, and the missing-shard check."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import tarfile
from pathlib import Path

import pytest

from ember.data.build import (
    VAL_PIECE_BYTES,
    VAL_PIECES_PER_FILE,
    build_text_shards,
    collect_source_files,
    ensure_shards,
    expand_urls,
    is_validation,
    local_path,
    sample_key,
    split_train_val,
    val_pieces,
)
from ember.errors import UserError
from ember.spec.data import DataSpec, ShardSet, TextBuildSpec


def shard_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert all(name.endswith(".txt") for name in names)
    return [name[: -len(".txt")] for name in names]


def test_build_writes_shards_that_match_their_manifest(stdlib_shards: Path) -> None:
    manifest = json.loads((stdlib_shards / "shards.json").read_text())
    names = [shard["name"] for shard in manifest["shards"]]
    assert names == [f"train-{i:06d}.tar" for i in range(4)] + ["val-000000.tar"]
    assert manifest["source"] == "stdlib"
    assert manifest["created_by"] == "ember"
    for shard in manifest["shards"]:
        data = (stdlib_shards / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data)
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["samples"] == len(shard_keys(stdlib_shards / shard["name"]))
    assert all(shard["samples"] > 0 for shard in manifest["shards"])


def test_build_keys_are_unique_dotless_and_val_is_disjoint_from_train(stdlib_shards: Path) -> None:
    train = [key for i in range(4) for key in shard_keys(stdlib_shards / f"train-{i:06d}.tar")]
    val = shard_keys(stdlib_shards / "val-000000.tar")
    assert len(set(train)) == len(train)
    assert len(set(val)) == len(val)
    assert not set(train) & set(val)
    assert all("." not in key and "/" not in key for key in train + val)


def test_build_splits_by_path_hash_and_respects_max_bytes(stdlib_shards: Path) -> None:
    files = collect_source_files("stdlib", max_bytes=2_000_000)
    assert 0 < sum(f.size for f in files) <= 2_000_000
    assert all("test" not in Path(f.relpath).parts[:-1] for f in files)
    val_files = {key.rsplit("-p", 1)[0] for key in shard_keys(stdlib_shards / "val-000000.tar")}
    expected = {sample_key(f.relpath) for f in files if is_validation(f.relpath, 0.05)}
    assert val_files == expected


def test_val_pieces_come_from_every_held_out_file_and_any_prefix_spans_the_corpus(stdlib_shards: Path) -> None:
    """An evaluation reads the val shard's first rows: they must sample the held-out files, not the first few,
    and no single file may dominate them."""
    files = collect_source_files("stdlib", max_bytes=2_000_000)
    val = {sample_key(f.relpath): f.path.read_bytes() for f in files if is_validation(f.relpath, 0.05) and f.size}
    with tarfile.open(stdlib_shards / "val-000000.tar") as tar:
        pieces = [(m.name[: -len(".txt")], tar.extractfile(m).read()) for m in tar.getmembers()]
    kept: dict[str, dict[int, bytes]] = {}
    for key, data in pieces:
        name, index = key.rsplit("-p", 1)
        kept.setdefault(name, {})[int(index)] = data
        assert 0 < len(data) <= VAL_PIECE_BYTES
    assert set(kept) == set(val)
    for name, parts in kept.items():
        assert len(parts) <= VAL_PIECES_PER_FILE
        text, start = val[name], 0
        for index in range(max(parts) + 1):  # re-cut the file: every kept piece is the piece of its index
            end = min(start + VAL_PIECE_BYTES, len(text))
            if end < len(text):
                end = text.rfind(b"\n", start, end) + 1 or end
            assert parts.get(index, text[start:end]) == text[start:end]
            start = end
        if len(parts) < VAL_PIECES_PER_FILE:
            assert start == len(text)  # a small file is kept whole
    assert len(pieces) > 2 * len(val)  # files really were cut
    # The whole stdlib's held-out split (what the quickstart builds): 64 KB, the rows its evaluation reads, come
    # from many files, and pieces of one file are seldom neighbours (file by file: all but one per file are).
    whole = val_pieces(split_train_val(collect_source_files("stdlib"), 0.05)[1])
    sizes = list(itertools.accumulate(len(piece["txt"]) for piece in whole))
    evaluated = whole[: bisect.bisect_left(sizes, 64 * 1024) + 1]
    assert len({piece["__key__"].rsplit("-p", 1)[0] for piece in evaluated}) >= 8
    names = [piece["__key__"].rsplit("-p", 1)[0] for piece in whole]
    assert sum(a == b for a, b in itertools.pairwise(names)) < len(whole) // 8
    assert max(names.count(name) for name in names) <= VAL_PIECES_PER_FILE


def test_train_shards_start_with_files_from_the_whole_corpus(stdlib_shards: Path) -> None:
    """A run shorter than an epoch reads each shard's start: it must not be the alphabetically first modules."""
    keys = shard_keys(stdlib_shards / "train-000000.tar")
    assert keys != sorted(keys)
    everything = sorted(k for i in range(4) for k in shard_keys(stdlib_shards / f"train-{i:06d}.tar"))
    first_quarter = set(everything[: len(everything) // 4])
    head = keys[: len(keys) // 4]  # dealt in path order, most of it came from the first quarter (5 of 7 here)
    assert sum(key in first_quarter for key in head) < len(head) / 2


def test_build_is_deterministic(tiny_stdlib_shards: Path, tmp_path: Path) -> None:
    again = build_text_shards(tmp_path / "again", train_shards=4, max_bytes=150_000)
    first = json.loads((tiny_stdlib_shards / "shards.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]


def test_build_into_a_non_empty_folder_leaves_no_staging_behind(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    out.mkdir()
    (out / "README").write_text("kept")
    manifest = build_text_shards(out, train_shards=2, max_bytes=100_000)
    assert (out / "README").read_text() == "kept"
    assert all((out / shard["name"]).is_file() for shard in manifest["shards"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_build_refuses_more_shards_than_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train_shards"):
        build_text_shards(tmp_path / "out", train_shards=50, max_bytes=20_000)
    assert not (tmp_path / "out").exists()


def test_expand_urls_expands_braces_in_order() -> None:
    assert expand_urls("d/train-{000000..000002}.tar") == [f"d/train-00000{i}.tar" for i in range(3)]
    assert expand_urls(["b-{1,0}.tar", "a.tar"]) == ["b-1.tar", "b-0.tar", "a.tar"]
    assert expand_urls("s3://bucket/x.tar") == ["s3://bucket/x.tar"]


def test_local_path_skips_remote_urls() -> None:
    assert local_path("/data/a.tar") == Path("/data/a.tar")
    assert local_path("file:///data/a.tar") == Path("/data/a.tar")
    assert [local_path(u) for u in ("http://h/a.tar", "s3://b/a.tar", "pipe:cat a.tar")] == [None] * 3


def test_ensure_shards_lists_every_missing_shard_in_one_error(tmp_path: Path) -> None:
    (tmp_path / "train-000001.tar").write_bytes(b"")
    spec = DataSpec(
        train=ShardSet(urls=[f"{tmp_path}/train-{{000000..000002}}.tar", "https://example.org/remote.tar"]),
        val=ShardSet(urls=f"file://{tmp_path}/val-000000.tar"),
    )
    with pytest.raises(UserError) as caught:
        ensure_shards(spec)
    message = str(caught.value)
    for name in ("train-000000.tar", "train-000002.tar", "val-000000.tar"):
        assert name in message
    assert "train-000001.tar" not in message
    assert "remote.tar" not in message
    assert "ember data build text" in message


def test_ensure_shards_builds_missing_shards_when_the_spec_says_how(tmp_path: Path) -> None:
    out = tmp_path / "built"
    spec = DataSpec(
        train=ShardSet(urls=f"{out}/train-{{000000..000001}}.tar"),
        val=ShardSet(urls=f"{out}/val-000000.tar"),
        build=TextBuildSpec(out=str(out), train_shards=2),
    )
    ensure_shards(spec)
    built = (out / "shards.json").stat().st_mtime_ns
    ensure_shards(spec)
    assert (out / "shards.json").stat().st_mtime_ns == built  # complete now: not rebuilt


def test_text_shards_of_the_old_layout_are_kept_and_said_to_be_stale(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "built"
    spec = DataSpec(
        train=ShardSet(urls=f"{out}/train-{{000000..000001}}.tar"),
        val=ShardSet(urls=f"{out}/val-000000.tar"),
        build=TextBuildSpec(out=str(out), train_shards=2),
    )
    build_text_shards(out, train_shards=2, max_bytes=100_000)  # small: the check reads the manifest alone
    ensure_shards(spec)
    assert "older ember" not in caplog.text
    manifest = json.loads((out / "shards.json").read_text())
    del manifest["val_pieces_per_file"], manifest["val_piece_bytes"]  # what an ember before the pieces wrote
    (out / "shards.json").write_text(json.dumps(manifest))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    ensure_shards(spec)
    assert "older ember" in caplog.text and str(out) in caplog.text
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # warned, not replaced
