"""`ember up` / `ember down`: a Ray head (or worker) on this machine with token auth always on.

Ray 2.60 leaves token auth off for `ray start` unless told (an unauthenticated GET /api/jobs/ would
answer 200); ember generates the token if there is none and starts every process with
RAY_AUTH_MODE=token. Each cluster gets its own temp folder, which is how `ember down` finds exactly
its processes - `ray stop` would stop every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
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
    """Where Ray reads its token file: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (Ray's own precedence)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


@dataclass
class UpOptions:
    name: str = "local"
    port: int = 8265  # dashboard / Jobs API
    gcs_port: int = 6379
    num_cpus: int | None = None
    join: str | None = None  # HEAD_IP:GCS_PORT: start a worker node
    ip: str | None = None  # this node's address; head: 127.0.0.1, worker: the one that reaches the head
    token_file: Path | None = None  # a worker's copy of the head's token


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


def up(state_dir: Path, options: UpOptions) -> LocalCluster:
    existing = state_dir / f"{options.name}.json"
    if existing.is_file():
        raise UserError(f"cluster {options.name!r} is already up ({existing}); "
                        f"`ember down --name {options.name}` first")
    env = ray_env()
    installs_token = options.token_file is not None and not token_path().is_file()
    # short (Ray's socket paths must fit in 107 bytes) and unique, so `ember down` finds only this node's processes
    temp_dir = Path("/tmp") / f"ember-ray-{options.name}-{secrets.token_hex(3)}"
    token = join_token(options, env) if options.join else head_token(env)
    cluster, args = join_args(options, temp_dir, token) if options.join else head_args(options, temp_dir, token)
    try:
        run_ray(["start", f"--temp-dir={temp_dir}", "--disable-usage-stats", *args], env)
    except UserError as failed:
        if installs_token:  # a refused token is not left behind as this host's token
            token.unlink(missing_ok=True)
        raise refusal(options, failed) from None
    cluster.save(state_dir)
    return cluster


def head_token(env: dict[str, str]) -> Path:
    path = token_path()
    if not path.is_file() and "RAY_AUTH_TOKEN" not in env:
        run_ray(["get-auth-token", "--generate"], env)
    return path


def join_token(options: UpOptions, env: dict[str, str]) -> Path:
    """The head's token, on this host: from --token-file (installed as ~/.ray/auth_token), RAY_AUTH_TOKEN or
    a ~/.ray/auth_token already here. A worker never makes up a token of its own: the head would refuse it."""
    path = token_path()
    if options.token_file is not None:
        install_token(read_token_file(options.token_file), path)
    elif "RAY_AUTH_TOKEN" not in env and not path.is_file():
        raise UserError(
            f"--join {options.join}: this host has no token for that cluster; copy the head's ~/.ray/auth_token "
            "here and pass --token-file FILE (or set RAY_AUTH_TOKEN)"
        )
    return path


def read_token_file(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"--token-file {path}: no such file")
    token = path.read_text().strip()
    if not token or any(c.isspace() for c in token):
        raise UserError(f"--token-file {path}: must hold one token (no spaces)")
    return token


def install_token(token: str, path: Path) -> None:
    """Ray's processes on this host read ~/.ray/auth_token; a different token already there is not overwritten."""
    if path.is_file():
        if path.read_text().strip() != token:
            raise UserError(f"--token-file: {path} already holds a different token; remove it if it is stale")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(token + "\n")


def head_args(options: UpOptions, temp_dir: Path, token: Path) -> tuple[LocalCluster, list[str]]:
    ip = options.ip or "127.0.0.1"
    args = ["--head", f"--node-ip-address={ip}", f"--port={options.gcs_port}", f"--dashboard-host={ip}",
            f"--dashboard-port={options.port}", "--include-dashboard=true", *cpu_args(options)]
    cluster = LocalCluster(options.name, "head", f"{ip}:{options.gcs_port}", f"http://{ip}:{options.port}",
                           str(temp_dir), str(token))
    return cluster, args


def join_args(options: UpOptions, temp_dir: Path, token: Path) -> tuple[LocalCluster, list[str]]:
    ip = options.ip or address_towards(options.join)
    args = [f"--address={options.join}", f"--node-ip-address={ip}", *cpu_args(options)]
    return LocalCluster(options.name, "worker", options.join, None, str(temp_dir), str(token)), args


def cpu_args(options: UpOptions) -> list[str]:
    return [f"--num-cpus={options.num_cpus}"] if options.num_cpus is not None else []


def address_towards(head: str) -> str:
    """This host's own address on the route to the head (no packet is sent: UDP connect only picks the route)."""
    host = head.rsplit(":", 1)[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
        except OSError as err:
            raise UserError(f"--join {head}: no route to {host} ({err})") from None
        return probe.getsockname()[0]


def refusal(options: UpOptions, failed: UserError) -> UserError:
    """A head that rejects this host's token says so deep in `ray start`'s output: one line instead."""
    if options.join and any(word in str(failed) for word in ("UNAUTHENTICATED", "Authentication", "auth token")):
        return UserError(f"--join {options.join}: the head refused this host's token; use a copy of the head's "
                         "~/.ray/auth_token (--token-file FILE)")
    return failed


def join_instructions(cluster: LocalCluster) -> str:
    """What `ember up` prints on the head: how another host joins it."""
    return (f"to add a host: copy {cluster.token_path} to it (e.g. scp), then run there:\n"
            f"  ember up --join {cluster.address} --token-file auth_token")


def down(state_dir: Path, name: str) -> int:
    """Stop the processes of the cluster `name` started (and their children); returns how many."""
    record = state_dir / f"{name}.json"
    if not record.is_file():
        raise UserError(f"no cluster {name!r} started by `ember up` (nothing in {state_dir})")
    cluster = LocalCluster(**json.loads(record.read_text()))
    stopped = stop_processes_under(cluster.temp_dir)
    record.unlink()
    return stopped


def running_heads(state_dir: Path) -> list[LocalCluster]:
    """The heads `ember up` started on this machine whose GCS still runs (a record left by a Ray that died, or
    one that cannot be read, is skipped)."""
    heads = []
    for record in sorted(state_dir.glob("*.json")) if state_dir.is_dir() else []:
        try:
            cluster = LocalCluster(**json.loads(record.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if cluster.role == "head" and _gcs_running_under(cluster.temp_dir):
            heads.append(cluster)
    return heads


def _gcs_running_under(temp_dir: str) -> bool:
    return any(_is_gcs(process) for process in processes_naming(temp_dir))


def processes_naming(temp_dir: str) -> list[psutil.Process]:
    """The processes naming temp_dir on their command line: the Ray `ember up` started there."""
    return [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in part for part in p.info["cmdline"] or [])]


def stop_processes_under(temp_dir: str) -> int:
    """Terminate (then kill) every process naming temp_dir on its command line, and their children."""
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}  # a caller whose own command line names the folder
    roots = processes_naming(temp_dir)
    processes = {p.pid: p for root in roots for p in [root, *_children(root)] if p.pid not in spared}
    # The GCS last: the raylet, agents and monitors exit at once on SIGTERM while it is up; terminated together
    # with it, the raylet waits ~12 s for it and the GCS and log monitor did not exit within 20 s (measured).
    gcs = [p for p in processes.values() if _is_gcs(p)]
    alive = _terminate([p for p in processes.values() if p not in gcs], timeout=15)
    alive += _terminate(gcs, timeout=15)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return len(processes)


def _is_gcs(process: psutil.Process) -> bool:
    try:
        return any(part.endswith("gcs_server") for part in process.cmdline()[:1])
    except psutil.Error:
        return False


def _terminate(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """SIGTERM to each, then wait up to `timeout`; returns the ones still alive."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    return psutil.wait_procs(processes, timeout=timeout)[1]


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
