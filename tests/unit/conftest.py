"""Shard sets built once per session from real data (the standard library, scikit-learn's digits and sample
photos), small enough to keep unit tests fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember.data.build import build_text_shards
from ember.data.build_images import build_image_shards


@pytest.fixture
def one_thread():
    """Tiny tensors: a second OpenMP thread only adds barrier waits on a shared two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's 1797 digits at 8x8: 15 train shards of 100 and a val shard of 297."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    build_image_shards(out, "digits", shard_size=100)
    return out


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Patches of scikit-learn's two sample photos at 8x8: 6 train shards of up to 256 and a val shard."""
    out = tmp_path_factory.mktemp("photos") / "shards"
    build_image_shards(out, "sample-images", shard_size=256, image_size=8)
    return out
