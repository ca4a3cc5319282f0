"""`ember submit|status|logs|stop|list`: job specs over Ray's Jobs API, always with the cluster's token.

The spec is validated here first (nothing is sent for a bad one), then shipped in the job's
working_dir as its resolved YAML; the entrypoint is `ember run` against the cluster it runs on.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from ember.errors import UserError
from ember.spec import JobSpec

SPEC_NAME = "ember-job.yaml"


def resolve_address(flag: str | None, spec_address: str | None, recorded: str | None) -> str:
    """--address, then the spec's cluster.address (if not local), then RAY_ADDRESS, then `ember up`'s head."""
    for candidate in (flag, spec_address if spec_address not in (None, "local", "auto") else None,
                      os.environ.get("RAY_ADDRESS"), recorded):
        if candidate:
            return candidate if "://" in candidate else f"http://{candidate}"
    raise UserError("no cluster address: pass --address http://HOST:8265, set RAY_ADDRESS, or run `ember up`")


def has_token() -> bool:
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or path.is_file()


def connect(address: str):
    """A JobSubmissionClient that sends the token; a missing or rejected token is the user's to fix."""
    if not has_token():
        raise UserError(
            f"no Ray auth token for {address}: set RAY_AUTH_TOKEN, or copy the cluster's token (`ray get-auth-token` "
            "on the head) to ~/.ray/auth_token. ember never talks to a cluster without auth."
        )
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise UserError(f"{address} rejected the auth token; use the token of that cluster (RAY_AUTH_TOKEN)") from None
    except ConnectionError as err:
        raise UserError(f"cannot reach the Ray dashboard at {address}: {err}") from None


def submit(spec_path: Path, overrides: list[str], address: str | None, recorded: str | None) -> tuple[str, str]:
    spec = JobSpec.load(spec_path, overrides)  # exit 2 here, before anything is sent
    if spec.run_dir is None:  # the job's own working folder is temporary: outputs go where `ember run` would
        spec = spec.model_copy(update={"run_dir": str(spec.output_dir)})
    target = resolve_address(address, spec.cluster.address, recorded)
    client = connect(target)
    with tempfile.TemporaryDirectory(prefix="ember-submit-") as folder:
        Path(folder, SPEC_NAME).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        job_id = submit_with_retry(
            client,
            entrypoint=f"ember run {SPEC_NAME} --set cluster.address=auto",
            runtime_env={"working_dir": folder, "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
            submission_id=f"ember-{spec.name}-{int(time.time())}",
            metadata={"ember_job": spec.name},
        )
    return job_id, target


def submit_with_retry(client, timeout_s: float = 300.0, **job) -> str:
    """A head that just started has no job agent yet and says so with a 500; that one is worth waiting out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err):
                raise UserError(f"the cluster refused the job: {err}") from None
            if time.monotonic() > deadline:
                raise UserError(
                    f"the cluster's job agent did not come up within {timeout_s:.0f} s; check the head with "
                    "`ray status` and its dashboard_agent.log, then submit again"
                ) from None
            time.sleep(1.0)


def status(client, job_id: str) -> str:
    return str(client.get_job_status(job_id).value)


def logs(client, job_id: str, follow: bool, write: Callable[[str], None]) -> None:
    """Print the job's logs; with follow, stream them until the job ends."""
    if not follow:
        write(client.get_job_logs(job_id))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


def list_jobs(client) -> list[tuple[str, str, str]]:
    jobs = client.list_jobs()
    return [(job.submission_id or job.job_id or "?", str(job.status.value), job.entrypoint) for job in jobs]
