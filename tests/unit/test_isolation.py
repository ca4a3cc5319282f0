"""The suite is isolated from the developer's Ray: no address to join, no token, and a token path of its own."""

from __future__ import annotations

import os
from pathlib import Path

from ember.cluster.local import token_path


def test_tests_see_no_ray_address_or_token_and_a_temporary_token_path(isolated_ray: Path) -> None:
    assert "RAY_ADDRESS" not in os.environ
    assert "RAY_AUTH_TOKEN" not in os.environ
    assert token_path() == isolated_ray
    assert not str(isolated_ray).startswith(str(Path.home() / ".ray"))
