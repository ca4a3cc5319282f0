"""Several hosts on this one machine, made of Linux namespaces: a stand-in for a real cluster.

Each host has its own network namespace with an address on a private bridge (10.213.N.0/24, N picked free;
the bridge itself is 10.213.N.1), its loopback up, its own hostname, and its own mount namespace in which
`/tmp`, `/dev/shm` and `$HOME` (/home/ember, so its own ~/.ray) are private. Every other path (the
Python install, the worktree) is the machine's own: it stands for software installed on each host.
Cluster hosts also see one shared folder at the same path (standing for NFS); a "laptop" host does not.
/etc/hosts names every host, as DNS would.

A login host (`add_host(..., login=True)`) is a machine one reaches over SSH: its own /etc/passwd (root's home is
the host's /home/ember, so `ssh` and `sshd` find the host's own ~/.ssh and ~/.ray), its own /run, and its own
Python install (an overlay over this machine's, so a `pip install` there changes only that host). `start_sshd`
runs OpenSSH's server at the host's IP in a PID namespace of its own: what runs in a login session, `ray stop`
included, sees only that host's processes.

A host's mount and UTS namespaces live as long as a holder process (`sleep infinity`) started inside them;
commands enter a host with `nsenter -t HOLDER --net --mount --uts`. Every process of a host sits in its
network namespace, so `ip netns pids` finds all of them: killing a host kills exactly those PIDs.

By hand:
    python -m tests.hosts.harness up 2 --laptop     # host1, host2 (shared folder) and laptop
    python -m tests.hosts.harness shell host1       # a shell on host1 (or: run host1 -- CMD ...)
    python -m tests.hosts.harness down              # everything `up` made
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STATE_ROOT = Path("/var/tmp/ember-hosts")  # not under /tmp: every host gets its own /tmp
SUBNET_PREFIX = "10.213"
HOME_IN_HOST = "/home/ember"
REPO = Path(__file__).resolve().parents[2]  # the code every host runs, as a real cluster installs it on each node
NAMESPACE_TOOLS = ("ip", "nsenter", "unshare")


class HostsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, tools missing, a sandbox that forbids them)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def check_namespaces_available() -> None:
    """Raises HostsUnavailable with the reason when this machine cannot make namespaced hosts."""
    if os.geteuid() != 0:
        raise HostsUnavailable("namespaced hosts need root (ip netns, mount namespaces)")
    missing = [tool for tool in NAMESPACE_TOOLS if shutil.which(tool) is None]
    if missing:
        raise HostsUnavailable(f"namespaced hosts need {', '.join(missing)} (iproute2, util-linux)")
    probe = f"ember-probe-{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        raise HostsUnavailable(f"`ip netns add` fails here: {made.stderr.strip()}")
    ip("netns", "del", probe, check=False)


def pids_in_netns(netns: str) -> list[int]:
    listed = ip("netns", "pids", netns, check=False)
    return [int(pid) for pid in listed.stdout.split()] if listed.returncode == 0 else []


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_all(pids: list[int], timeout: float = 10.0) -> None:
    """SIGKILL every PID at once (a host losing power), then wait until they are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        for pid in pids:  # reap the ones that are our own children
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)


@dataclass
class Host:
    """One namespaced host: run commands in it, map its private paths to this machine's, kill it."""

    name: str
    ip: str
    netns: str
    folder: Path  # this machine's view of the host's private tmp/, shm/ (unused) and home/
    shared: bool
    login: bool = False  # own /etc/passwd, /run and Python install: reached over SSH (start_sshd)
    link: str = ""  # the outside end of its veth pair, on the bridge
    holder_pid: int = 0
    started: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def home(self) -> str:
        return HOME_IN_HOST

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The caller's environment (PATH, PYTHONPATH, ...) with this host's HOME and name."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_ADDRESS", "TMPDIR"))}
        env.update(HOME=HOME_IN_HOST, HOSTNAME=self.name, RAY_USAGE_STATS_ENABLED="0")
        return {**env, **(extra or {})}

    def command(self, argv: list[str], cwd: str | None = None) -> list[str]:
        enter = ["nsenter", "-t", str(self.holder_pid), "--net", "--mount", "--uts", "--"]
        # `cd` inside: nsenter's --wd opens the folder before entering the host's mounts
        return [*enter, "sh", "-c", 'cd "$0" && exec "$@"', cwd or HOME_IN_HOST, *argv]

    def run(self, argv: list[str] | str, *, env: dict[str, str] | None = None, cwd: str | None = None,
            timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        """Runs a command on this host and waits for it (a string runs under `sh -c`)."""
        argv = ["sh", "-c", argv] if isinstance(argv, str) else argv
        return subprocess.run(self.command(argv, cwd), env=self.env(env), capture_output=True, text=True,
                              timeout=timeout, check=check)

    def popen(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
              own_pids: bool = False, **kwargs) -> subprocess.Popen:
        """Starts a command on this host and keeps its Popen (its PID) so `kill` and `down` stop it. `own_pids`:
        in a new PID namespace (with its own /proc), as PID 1, so it and its descendants see only each other, and
        when it dies the kernel kills every one of them."""
        if own_pids:
            argv = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *argv]
        process = subprocess.Popen(self.command(argv, cwd), env=self.env(env), start_new_session=True, **kwargs)
        self.started.append(process)
        return process

    def start_sshd(self, authorized_key: str, path: str) -> subprocess.Popen:
        """OpenSSH's server on a login host, at its IP, port 22: root logs in with the key only (its home is
        /home/ember), and login sessions get `path` as PATH (this machine's Python, as installed software would
        be). Its config, host key and log live in the host's /tmp/sshd; it runs in its own PID namespace."""
        assert self.login, f"{self.name} is not a login host (add_host(..., login=True))"
        folder, ssh = self.outside("/tmp/sshd"), self.outside(f"{HOME_IN_HOST}/.ssh")
        folder.mkdir(parents=True, exist_ok=True)
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        (ssh / "authorized_keys").write_text(authorized_key.strip() + "\n")
        (ssh / "environment").write_text(f"PATH={path}\nRAY_USAGE_STATS_ENABLED=0\n")  # `ssh host CMD`
        # login shells (`bash --login`, as Ray's launcher runs commands) reset PATH in /etc/profile, then read these
        bashrc = f"export PATH={path}\nexport RAY_USAGE_STATS_ENABLED=0\n"
        (ssh.parent / ".bashrc").write_text(bashrc)
        (ssh.parent / ".profile").write_text(". ~/.bashrc\n")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
        (folder / "sshd_config").write_text("\n".join([
            f"ListenAddress {self.ip}", "Port 22", "HostKey /tmp/sshd/host_key", "PidFile /tmp/sshd/sshd.pid",
            "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", f"AuthorizedKeysFile {HOME_IN_HOST}/.ssh/authorized_keys",
            "PermitUserEnvironment yes", "StrictModes no", "Subsystem sftp internal-sftp", ""]))
        log = open(folder / "sshd.log", "w")  # noqa: SIM115 - sshd writes to it until the host goes
        sshd = self.popen(["/usr/sbin/sshd", "-D", "-e", "-f", "/tmp/sshd/sshd_config"], own_pids=True,
                          stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "Server listening" not in (folder / "sshd.log").read_text():
            if sshd.poll() is not None or time.monotonic() > deadline:
                raise HostsUnavailable(f"sshd did not start on {self.name}: {(folder / 'sshd.log').read_text()}")
            time.sleep(0.05)
        return sshd

    def outside(self, path: str) -> Path:
        """This machine's path for a file under the host's private /tmp or $HOME (to read its logs)."""
        for inside, folder in (("/tmp", "tmp"), ("/home", "home")):
            if path == inside or path.startswith(inside + "/"):
                return self.folder / folder / os.path.relpath(path, inside)
        return Path(path)

    def pids(self) -> list[int]:
        return pids_in_netns(self.netns)

    def command_lines(self) -> list[str]:
        """The command line of every process on this host (those that exit while being read left out)."""
        lines = []
        for pid in self.pids():
            try:
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except FileNotFoundError:
                continue
        return lines

    def kill(self) -> None:
        """The whole host goes down at once: every process in its network namespace gets SIGKILL."""
        for _ in range(5):  # again, for any process forked while the first ones died
            pids = self.pids()
            if not pids:
                break
            kill_all(pids)
        for process in self.started:
            with contextlib.suppress(Exception):
                process.wait(timeout=1)
        self.started.clear()


class HostCluster:
    """A bridge, the hosts on it, and one shared folder; `down` removes all of it."""

    def __init__(self, net: int, owner_pid: int | None) -> None:
        self.net = net
        self.owner_pid = owner_pid  # None: made by hand (`up`), lives until `down`
        self.root = STATE_ROOT / f"net{net}"
        self.bridge = f"ember{net}br"
        self.hosts: dict[str, Host] = {}
        self.last_index = 1  # .1 is the bridge

    @property
    def shared_dir(self) -> Path:
        """The folder every cluster host sees at this same path (the laptop does not)."""
        return self.root / "shared"

    @property
    def gateway(self) -> str:
        return f"{SUBNET_PREFIX}.{self.net}.1"

    @classmethod
    def create(cls, owner_pid: int | None) -> HostCluster:
        """Picks a free 10.213.N.0/24 (under a lock: several sessions share the machine) and makes its bridge."""
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        with open(STATE_ROOT / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            remove_abandoned()
            net = next(n for n in range(256) if not (STATE_ROOT / f"net{n}").exists())
            cluster = cls(net, owner_pid)
            cluster.shared_dir.mkdir(parents=True)
            cluster.save()
        try:
            ip("link", "add", cluster.bridge, "type", "bridge")
            ip("addr", "add", f"{cluster.gateway}/24", "dev", cluster.bridge)
            ip("link", "set", cluster.bridge, "up")
        except subprocess.CalledProcessError as error:
            cluster.down()
            raise HostsUnavailable(f"cannot make the bridge: {error.stderr.strip()}") from error
        return cluster

    def add_host(self, name: str, shared: bool = True, login: bool = False) -> Host:
        """A new host with the next address; `shared=False` makes a laptop without the shared folder; `login=True`
        a machine one reaches over SSH (see the module's docstring)."""
        # a fresh address even where a removed host's is free: a host that replaces a dead one is another machine
        self.last_index = index = self.last_index + 1
        host = Host(name=name, ip=f"{SUBNET_PREFIX}.{self.net}.{index}", netns=f"ember{self.net}-{name}",
                    folder=self.root / "hosts" / name, shared=shared, login=login, link=f"e{self.net}x{index}")
        self.hosts[name] = host
        self.save()
        self.write_etc_hosts()
        self.make_network(host, index)
        self.start_holder(host)
        self.save()
        return host

    def make_network(self, host: Host, index: int) -> None:
        outside, inside = host.link, f"e{self.net}y{index}"  # interface names: 15 characters at most
        ip("netns", "add", host.netns)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", host.netns)
        ip("link", "set", outside, "master", self.bridge)
        ip("link", "set", outside, "up")
        in_host = ["-n", host.netns]
        ip(*in_host, "link", "set", inside, "name", "eth0")
        ip(*in_host, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        ip(*in_host, "link", "set", "eth0", "up")
        ip(*in_host, "link", "set", "lo", "up")

    def start_holder(self, host: Host) -> None:
        """A process in the host's new mount and UTS namespaces that sets them up, then keeps them alive."""
        for sub in ("tmp", "home/ember"):
            (host.folder / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(host.folder / "tmp", 0o1777)
        hide = self.root if not host.shared else self.root / "hosts"  # other hosts' folders; the laptop: shared too
        code = []  # a checkout under /tmp (CI clones there) stays at its path inside the host's private /tmp
        if REPO.is_relative_to("/tmp"):
            seat = host.folder / "tmp" / REPO.relative_to("/tmp")
            seat.mkdir(parents=True, exist_ok=True)
            code = [f"mount --bind {REPO} {seat}"]
        setup = [
            f"hostname {host.name}",
            *code,
            f"mount --rbind {host.folder / 'tmp'} /tmp",
            "mount -t tmpfs -o size=4g,mode=1777 tmpfs /dev/shm",
            f"mount --bind {host.folder / 'home'} /home",
            f"mount --bind {self.root / 'etc-hosts'} /etc/hosts",
            *(self.login_mounts(host) if host.login else []),
            f"mount -t tmpfs -o size=1m tmpfs {hide}",
            "echo ready",
            "exec sleep infinity",
        ]
        argv = ["nsenter", f"--net=/run/netns/{host.netns}", "unshare", "--mount", "--uts", "--propagation",
                "private", "sh", "-ec", "; ".join(setup)]
        holder = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        if holder.stdout.readline().strip() != "ready":
            raise HostsUnavailable(f"cannot set up host {host.name}'s mounts: {holder.stderr.read().strip()}")
        host.holder_pid = holder.pid

    @staticmethod
    def login_mounts(host: Host) -> list[str]:
        """A login host's own passwd (root's home is /home/ember), /run, and Python install (an overlay)."""
        etc = host.folder / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        passwd = [line.split(":") for line in Path("/etc/passwd").read_text().splitlines()]
        for entry in passwd:
            if entry[0] == "root":
                entry[5] = HOME_IN_HOST
        (etc / "passwd").write_text("".join(":".join(entry) + "\n" for entry in passwd))
        prefix = Path(sys.prefix).resolve()
        upper, work = host.folder / "python" / "upper", host.folder / "python" / "work"
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        return [
            f"mount --bind {etc / 'passwd'} /etc/passwd",
            "mount -t tmpfs -o size=64m,mode=755 tmpfs /run",
            "mkdir -m 755 /run/sshd",  # OpenSSH's privilege separation folder
            f"mount -t overlay overlay -o lowerdir={prefix},upperdir={upper},workdir={work} {prefix}",
        ]

    def write_etc_hosts(self) -> None:
        lines = ["127.0.0.1 localhost", *(f"{host.ip} {host.name}" for host in self.hosts.values())]
        path = self.root / "etc-hosts"
        with open(path, "a+") as file:  # rewritten in place: hosts bind-mount this very inode
            file.seek(0)
            file.truncate()
            file.write("\n".join(lines) + "\n")

    def remove_host(self, name: str) -> None:
        """Kills the host's processes and removes its namespace (its veth pair goes with it)."""
        host = self.hosts.pop(name)
        host.kill()
        ip("link", "del", host.link, check=False)  # explicitly: a namespace still referenced keeps its veth alive
        ip("netns", "del", host.netns, check=False)
        shutil.rmtree(host.folder, ignore_errors=True)
        self.save()

    def down(self) -> None:
        for name in list(self.hosts):
            self.remove_host(name)
        ip("link", "del", self.bridge, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def save(self) -> None:
        hosts = [{"name": h.name, "ip": h.ip, "netns": h.netns, "shared": h.shared, "login": h.login, "link": h.link,
                  "holder_pid": h.holder_pid} for h in self.hosts.values()]
        state = {"net": self.net, "owner_pid": self.owner_pid, "last_index": self.last_index, "hosts": hosts}
        (self.root / "state.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, root: Path) -> HostCluster:
        state = json.loads((root / "state.json").read_text())
        cluster = cls(state["net"], state["owner_pid"])
        cluster.last_index = state.get("last_index", 1)
        for entry in state["hosts"]:
            cluster.hosts[entry["name"]] = Host(folder=cluster.root / "hosts" / entry["name"], **entry)
        return cluster


def remove_abandoned() -> None:
    """Removes clusters whose owning process died without `down` (a test killed mid-run)."""
    for root in STATE_ROOT.glob("net*"):
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
            owner = json.loads((root / "state.json").read_text())["owner_pid"]
            if owner is not None and not pid_alive(owner):
                HostCluster.load(root).down()


def made_by_hand() -> list[HostCluster]:
    clusters = []
    for root in sorted(STATE_ROOT.glob("net*")):
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if json.loads((root / "state.json").read_text())["owner_pid"] is None:
                clusters.append(HostCluster.load(root))
    return clusters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.hosts.harness", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="make N cluster hosts (host1..hostN) sharing one folder")
    up.add_argument("n", type=int)
    up.add_argument("--laptop", action="store_true", help="also a host named laptop, without the shared folder")
    commands.add_parser("down", help="remove every host `up` made")
    commands.add_parser("list", help="the hosts `up` made")
    run = commands.add_parser("run", help="run a command on a host")
    run.add_argument("host")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    shell = commands.add_parser("shell", help="an interactive shell on a host")
    shell.add_argument("host")
    args = parser.parse_args(argv)
    if args.command == "up":
        check_namespaces_available()
        cluster = HostCluster.create(owner_pid=None)
        for i in range(1, args.n + 1):
            cluster.add_host(f"host{i}")
        if args.laptop:
            cluster.add_host("laptop", shared=False)
        print(describe(cluster))
        return 0
    if args.command == "down":
        for cluster in made_by_hand():
            cluster.down()
            print(f"removed {cluster.bridge} and its hosts")
        return 0
    if args.command == "list":
        print("\n".join(describe(cluster) for cluster in made_by_hand()) or "no hosts")
        return 0
    host = find_host(args.host)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    command = host.command(argv if args.command == "run" else [os.environ.get("SHELL", "bash")])
    os.execvpe(command[0], command, host.env())


def find_host(name: str) -> Host:
    for cluster in made_by_hand():
        if name in cluster.hosts:
            return cluster.hosts[name]
    raise SystemExit(f"no host named {name}: `python -m tests.hosts.harness list` shows them")


def describe(cluster: HostCluster) -> str:
    lines = [f"bridge {cluster.bridge} {cluster.gateway}/24, shared folder {cluster.shared_dir}"]
    for host in cluster.hosts.values():
        storage = "shared folder" if host.shared else "no shared folder"
        lines.append(f"  {host.name:8} {host.ip:14} {storage}; enter: nsenter -t {host.holder_pid} --net --mount "
                     f"--uts  (or: python -m tests.hosts.harness shell {host.name})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

