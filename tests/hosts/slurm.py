"""A real Slurm on namespaced hosts (tests/hosts/harness.py): one munged on this machine (the hosts share its
socket, as they share one munge key), slurmctld on the first host, a slurmd on every host, each daemon entered
into its host's network, mount and UTS namespaces, so it has the host's hostname and address.

Everything lives in a folder of its own, named by SLURM_CONF: an existing /etc/slurm or /etc/munge is left as it
is. Process tracking is proctrack/cgroup (cgroup v1 freezer), the usual setting on GPU clusters. Daemons run in
the foreground and are stopped by the PID this module started. Debian's packages: `bash .ci/hosts-packages.sh`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.hosts.harness import Host

DAEMONS = ("munged", "slurmctld", "slurmd")
# cred_expire also delays a requeued job's next start (cred_expire + 1 s): 120 s by default, short here, and
# the scheduler looks every 2 s (not 60) for the requeued job that became eligible.
SLURM_CONF = """\
ClusterName=emberhosts
SlurmctldHost={controller.name}({controller.ip})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge/munge.socket,cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=5
StateSaveLocation={folder}/ctld
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
{nodes}
PartitionName=hosts Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
# Debian's Slurm 22.05 defaults to cgroup v2 detection; these machines mount the v1 controllers.
CGROUP_CONF = "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nConstrainCores=no\nConstrainRAMSpace=no\n"


class SlurmUnavailable(RuntimeError):
    """Slurm's or munge's programs are missing here (install them with `bash .ci/hosts-packages.sh`)."""


def check_slurm_installed() -> None:
    missing = [daemon for daemon in DAEMONS if shutil.which(daemon, path="/usr/sbin:/usr/bin") is None]
    if missing or shutil.which("sbatch") is None:
        raise SlurmUnavailable(f"missing {', '.join(missing) or 'sbatch'}: run `bash .ci/hosts-packages.sh`")


@dataclass
class SlurmOnHosts:
    folder: Path
    hosts: list[Host]
    cpus_per_host: int = 1
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def controller(self) -> Host:
        return self.hosts[0]

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.folder / "slurm.conf")}

    def start(self) -> None:
        self.write_config()
        self.start_munge()
        self.daemons.append(self.controller.popen(["/usr/sbin/slurmctld", "-D", "-i"], env=self.env,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for host in self.hosts:
            self.daemons.append(host.popen(["/usr/sbin/slurmd", "-D"], env=self.env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))
        self.wait_until_idle()

    def write_config(self) -> None:
        for sub in ("ctld", "spool", "munge"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={h.name} NodeAddr={h.ip} CPUs={self.cpus_per_host} RealMemory=2000 "
                          "State=UNKNOWN" for h in self.hosts)
        (self.folder / "slurm.conf").write_text(SLURM_CONF.format(controller=self.controller, folder=self.folder,
                                                                  nodes=nodes))
        (self.folder / "cgroup.conf").write_text(CGROUP_CONF)

    def start_munge(self) -> None:
        """One munged, one key, for every host: they all reach its socket on this machine's filesystem."""
        munge = self.folder / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        owner = pwd.getpwnam("munge")
        for path in (munge, key):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        os.chmod(munge, 0o700)
        os.chmod(key, 0o400)
        command = ["/usr/sbin/munged", "--foreground", "--force", f"--socket={munge}/munge.socket",
                   f"--key-file={key}", f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                   f"--seed-file={munge}/munged.seed"]
        self.daemons.append(subprocess.Popen(command, user="munge", stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, start_new_session=True))
        wait_for(lambda: (munge / "munge.socket").exists(), 30, "munged's socket")

    def wait_until_idle(self) -> None:
        def all_idle() -> bool:
            states = self.controller.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, timeout=30).stdout.split()
            return len(states) == len(self.hosts) and set(states) == {"idle"}

        wait_for(all_idle, 60, f"slurmd on {', '.join(h.name for h in self.hosts)} (see {self.folder}/*.log)")

    def scontrol(self, *args: str) -> str:
        return self.controller.run(["scontrol", *args], env=self.env, timeout=30, check=True).stdout

    def job_field(self, job_id: str, name: str) -> str:
        fields = dict(item.split("=", 1) for item in self.scontrol("show", "job", "-o", job_id).split() if "=" in item)
        return fields[name]

    def stop(self) -> None:
        """SIGTERM every daemon this started, by PID, newest first; SIGKILL what is still there after 15 s."""
        for daemon in reversed(self.daemons):
            with contextlib.suppress(ProcessLookupError):
                daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=15)
        self.daemons.clear()


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll)
