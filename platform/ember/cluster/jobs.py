"""`ember submit|status|logs|stop|list`: job specs over Ray's Jobs API, always with the cluster's token.

The spec is validated here first (nothing is sent for a bad one), then shipped in the job's
working_dir as its resolved YAML; the entrypoint is `ember run` against the cluster it runs on.
Only that YAML travels: submitting to a cluster on another host, every path the spec names (run_dir,
shards, data.build.out) must be a URL or lie under cluster.shared_dirs, or the submit is refused.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import yaml

from ember.cluster.local import token_path
from ember.errors import UserError
from ember.spec import JobSpec
from ember.spec.paths import is_under, is_url

SPEC_NAME = "ember-job.yaml"


def resolve_address(flag: str | None, spec_address: str | None, recorded: str | None) -> str:
    """--address, then the spec's cluster.address (if not local), then RAY_ADDRESS, then `ember up`'s head."""
    for candidate in (flag, spec_address if spec_address not in (None, "local", "auto") else None,
                      os.environ.get("RAY_ADDRESS"), recorded):
        if candidate:
            return candidate if "://" in candidate else f"http://{candidate}"
    raise UserError("no cluster address: pass --address http://HOST:8265, set RAY_ADDRESS, or run `ember up`")


def has_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or token_path().is_file()


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


def submit(spec_path: Path, overrides: list[str], address: str | None, recorded: str | None,
           shared: list[str] | None = None) -> tuple[str, str]:
    spec = with_shared_dirs(JobSpec.load(spec_path, overrides), shared or [])
    target = resolve_address(address, spec.cluster.address, recorded)
    if on_this_machine(target):  # the cluster sees this machine's files: outputs go where `ember run` would
        spec = spec.model_copy(update={"run_dir": str(spec.output_dir)})
    else:
        refuse_what_the_cluster_cannot_see(spec)  # exit 2 here, before anything is sent
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


def with_shared_dirs(spec: JobSpec, shared: list[str]) -> JobSpec:
    """--shared DIR adds to the spec's cluster.shared_dirs (as an absolute path of this machine)."""
    folders = [*spec.cluster.shared_dirs, *(str(Path(folder).absolute()) for folder in shared)]
    return spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"shared_dirs": folders})})


def on_this_machine(address: str) -> bool:
    """A head at a loopback address runs here, so its nodes see this machine's files."""
    host = urlparse(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_what_the_cluster_cannot_see(spec: JobSpec) -> None:
    """Submitting from outside the cluster, only the resolved spec travels with the job: every path it names
    must be a URL or lie under cluster.shared_dirs (folders every cluster host mounts at the same path)."""
    problems = unreachable_fields(spec)
    if problems:
        shared = spec.cluster.shared_dirs or "none declared"
        raise UserError(
            f"the cluster cannot see these paths of this machine (cluster.shared_dirs: {shared}):\n  "
            + "\n  ".join(problems)
            + "\nPut them on storage every cluster host mounts at the same path and declare it (cluster.shared_dirs "
            "in the spec, or --shared DIR), or serve shards over http(s)://"
        )


def unreachable_fields(spec: JobSpec) -> list[str]:
    shared = spec.cluster.shared_dirs
    problems = []
    if spec.run_dir is None:
        problems.append(f"run_dir: not set, so it would be runs/{spec.name} under this machine's working folder; "
                        f"set it under a shared folder, e.g. --set run_dir=SHARED/runs/{spec.name}")
    elif not is_under(spec.run_dir, shared):
        problems.append(f"run_dir: {spec.run_dir} is not under a shared folder")
    for field, urls in shard_fields(spec):
        local = [url for url in urls if not is_url(url) and not is_under(url, shared)]
        if local:
            problems.append(f"{field}: {local[0]} is on this machine only")
    if spec.data.build is not None and not is_under(spec.data.build.out, shared):
        problems.append(f"data.build.out: {spec.data.build.out} is on this machine only (the job would build the "
                        "shards on the head host alone); build them into a shared folder, or set data.build=null")
    return problems


def shard_fields(spec: JobSpec) -> list[tuple[str, list[str]]]:
    data = spec.data
    named = [("data.train.urls", data.train), ("data.val.urls", data.val)]
    named += [(f"data.sources[{i}].urls", source) for i, source in enumerate(data.sources or [])]
    return [(field, [s.urls] if isinstance(s.urls, str) else s.urls) for field, s in named if s is not None]


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
