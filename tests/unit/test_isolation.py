"""Ray tests are isolated from the developer's Ray: no address to join, no token, a token file of their own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.cluster.local import token_path
from tests.conftest import isolate_ray


def test_isolation_clears_the_address_and_token_and_points_at_its_own_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-developers-token")
    own = isolate_ray(monkeypatch, tmp_path)
    assert "RAY_ADDRESS" not in os.environ
    assert "RAY_AUTH_TOKEN" not in os.environ
    assert token_path() == own
    assert own.parent == tmp_path
    assert own.read_text().strip()
