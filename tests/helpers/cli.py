"""Running ember's command line from tests: in this process (exit code and output), or as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ember.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`ember ARGS` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    captured = capsys.readouterr()
    return exited.value.code or 0, captured.out, captured.err


def ember(*args: str, env: dict[str, str], timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m ember.cli ARGS` as its own process; with check, a non-zero exit fails the test with the output."""
    done = subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done
