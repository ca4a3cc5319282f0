"""Suite-wide settings and shared data: no Ray usage reporting, one torch thread per process (2-core
machines), Ray isolated from the developer's own (address and token), and one real stdlib text shard set built
once per session for the end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def isolated_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests never join a Ray cluster the developer has running (RAY_ADDRESS), never send their token, and
    `ember up` writes its token under a temporary folder, not the real ~/.ray/auth_token. Session-wide, so that
    module fixtures and the subprocesses they start see it too."""
    token_path = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    patch = pytest.MonkeyPatch()
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        patch.delenv(name, raising=False)
    patch.setenv("RAY_AUTH_TOKEN_PATH", str(token_path))
    yield token_path
    patch.undo()


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 2 MB of the standard library's source: train-000000..000003.tar and val-000000.tar."""
    from ember.data.build import build_text_shards

    out = tmp_path_factory.mktemp("stdlib-text") / "shards"
    build_text_shards(out, train_shards=4, max_bytes=2_000_000)
    return out


def shard_overrides(shards: Path) -> list[str]:
    """--set items pointing a debug job at `text_shards`."""
    return [f"data.train.urls={shards}/train-{{000000..000003}}.tar", f"data.val.urls={shards}/val-000000.tar",
            "data.build=null"]
