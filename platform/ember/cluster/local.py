"""`ember up` / `ember down`: a Ray head (or worker) on this machine with token auth always on.

Ray 2.60 leaves token auth off for `ray start` unless told (an unauthenticated GET /api/jobs/ would
answer 200); ember generates the token if there is none and starts every process with
RAY_AUTH_MODE=token. Each cluster gets its own temp folder, which is how `ember down` finds exactly
its processes - `ray stop` would stop every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from ember.errors import UserError


@dataclass
class LocalCluster:
    name: str
    role: str  # head | worker
    address: str  # GCS address HOST:PORT, what `ember up --join` and ray.init take
    dashboard: str | None  # http://HOST:PORT, what `ember submit --address` takes
    temp_dir: str
    token_path: str

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / f"{self.name}.json").write_text(json.dumps(asdict(self), indent=1))


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))


def ensure_token(env: dict[str, str]) -> Path:
    path = token_path()
    if not path.is_file() and "RAY_AUTH_TOKEN" not in env:
        run_ray(["get-auth-token", "--generate"], env)
    return path


def ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


def run_ray(args: list[str], env: dict[str, str]) -> str:
    ray = shutil.which("ray")
    if ray is None:
        raise UserError("the `ray` command is not on PATH; install ember (pip install -e .) in this environment")
    done = subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise UserError(f"`ray {' '.join(args)}` failed:\n{(done.stderr or done.stdout)[-2000:]}")
    return done.stdout


def up(state_dir: Path, name: str, port: int, gcs_port: int, num_cpus: int | None, join: str | None) -> LocalCluster:
    existing = state_dir / f"{name}.json"
    if existing.is_file():
        raise UserError(f"cluster {name!r} is already up ({existing}); `ember down --name {name}` first")
    env = ray_env()
    token = ensure_token(env)
    temp_dir = Path("/tmp") / f"ember-ray-{name}"  # short: Ray's socket paths must fit in 107 bytes
    args = ["start", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    if join:
        args.append(f"--address={join}")
        cluster = LocalCluster(name, "worker", join, None, str(temp_dir), str(token))
    else:
        args += ["--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}",
                 "--include-dashboard=true"]
        dashboard = f"http://127.0.0.1:{port}"
        cluster = LocalCluster(name, "head", f"127.0.0.1:{gcs_port}", dashboard, str(temp_dir), str(token))
    run_ray(args, env)
    cluster.save(state_dir)
    return cluster


def down(state_dir: Path, name: str) -> int:
    """Stop the processes of the cluster `name` started (and their children); returns how many."""
    record = state_dir / f"{name}.json"
    if not record.is_file():
        raise UserError(f"no cluster {name!r} started by `ember up` (nothing in {state_dir})")
    cluster = LocalCluster(**json.loads(record.read_text()))
    stopped = stop_processes_under(cluster.temp_dir)
    record.unlink()
    return stopped


def stop_processes_under(temp_dir: str) -> int:
    """Terminate (then kill) every process naming temp_dir on its command line, and their children."""
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}  # a caller whose own command line names the folder
    roots = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in part for part in p.info["cmdline"] or [])]
    processes = {p.pid: p for root in roots for p in [root, *_children(root)] if p.pid not in spared}
    for process in processes.values():
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(processes.values()), timeout=15)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return len(processes)


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def recorded_dashboard(state_dir: Path, name: str = "local") -> str | None:
    record = state_dir / f"{name}.json"
    if record.is_file():
        return json.loads(record.read_text()).get("dashboard")
    return None
