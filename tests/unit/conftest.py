"""Shard sets built once per session from the real standard library, small enough to keep unit tests fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.data.build import build_text_shards


@pytest.fixture(scope="session")
def stdlib_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 2 MB of stdlib source in 4 train shards (~500 KB each) and one val shard."""
    out = tmp_path_factory.mktemp("stdlib-text") / "shards"
    build_text_shards(out, train_shards=4, max_bytes=2_000_000)
    return out


@pytest.fixture(scope="session")
def tiny_stdlib_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 150 KB in 4 train shards, so a stream passes an epoch within a few hundred rows."""
    out = tmp_path_factory.mktemp("stdlib-text-tiny") / "shards"
    build_text_shards(out, train_shards=4, max_bytes=150_000)
    return out
