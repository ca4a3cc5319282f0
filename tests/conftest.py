"""Suite-wide settings and shared data: no Ray usage reporting, one torch thread per process (2-core
machines), Ray isolated from the developer's own (address and token), and one real stdlib text shard set built
once per session for the end-to-end tests."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
DEVELOPER_RAY = ("RAY_ADDRESS", "RAY_AUTH_TOKEN")  # the developer's cluster and token: never reached by tests


def ray_token(folder: Path) -> Path:
    """The tests' own Ray token in `folder` (made once per folder: see ray_auth_folder)."""
    token_path = folder / "auth_token"
    if not token_path.exists():
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
    return token_path


def isolate_ray(patch: pytest.MonkeyPatch, folder: Path) -> Path:
    """No RAY_ADDRESS to join the developer's cluster, no RAY_AUTH_TOKEN to send, and a token of the tests' own
    (for the embedded Rays and `ember up`) instead of the real ~/.ray/auth_token. Returns the token's path."""
    token_path = ray_token(folder)
    for name in DEVELOPER_RAY:
        patch.delenv(name, raising=False)
    patch.setenv("RAY_AUTH_TOKEN_PATH", str(token_path))
    return token_path


def isolated_env(folder: Path, **extra: str) -> dict[str, str]:
    """This process's environment as isolate_ray leaves it, as a dict for a subprocess, plus `extra`."""
    env = {name: value for name, value in os.environ.items() if name not in DEVELOPER_RAY}
    return {**env, "RAY_AUTH_TOKEN_PATH": str(ray_token(folder)), "RAY_USAGE_STATS_ENABLED": "0", **extra}


@pytest.fixture(scope="session")
def ray_auth_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token for every `ray` module of the session: Ray keeps the first token it reads in the process, so a
    second module starting its own embedded Ray with another token would fail the GCS handshake."""
    return tmp_path_factory.mktemp("ray-auth")


@pytest.fixture(scope="module", autouse=True)
def isolated_ray(request: pytest.FixtureRequest) -> Iterator[Path | None]:
    """Every module marked `ray` runs isolated; module-wide, so its module fixtures and the processes they start
    see it too. Other tiers keep the environment (namespaced hosts have a /tmp of their own)."""
    if request.node.get_closest_marker("ray") is None:
        yield None
        return
    patch = pytest.MonkeyPatch()
    yield isolate_ray(patch, request.getfixturevalue("ray_auth_folder"))
    patch.undo()


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 2 MB of the standard library's source: train-000000..000003.tar and val-000000.tar."""
    from ember.data.build import build_text_shards

    out = tmp_path_factory.mktemp("stdlib-text") / "shards"
    build_text_shards(out, train_shards=4, max_bytes=2_000_000)
    return out


@pytest.fixture(scope="session")
def moe_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MoE GPT trained with EP=2 (4 experts, 2 per rank) by real DeepSpeed ranks, written once per session
    and only read after: the serving tests of every tier serve it (with EP=2 or 1) and compare to `generate`."""
    from tests.helpers.moe_checkpoint import write_moe_checkpoint

    return write_moe_checkpoint(tmp_path_factory.mktemp("moe-ep2") / "run", ep_size=2)


def shard_overrides(shards: Path) -> list[str]:
    """--set items pointing a debug job at `text_shards`."""
    return [f"data.train.urls={shards}/train-{{000000..000003}}.tar", f"data.val.urls={shards}/val-000000.tar",
            "data.build=null"]
