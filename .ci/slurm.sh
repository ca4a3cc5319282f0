#!/usr/bin/env bash
# A single-node Slurm for the launcher test, without systemd: munge + slurmctld + slurmd on this host.
#   eval "$(bash .ci/slurm.sh start)"   (installs Debian's packages if missing)   |   bash .ci/slurm.sh stop
# `start` prints the environment the tests need (SLURM_CONF) on stdout. It writes its own configuration,
# state and logs under $state and never touches an existing /etc/slurm/slurm.conf or munge key.
set -euo pipefail
state=/tmp/ember-slurm-ci
conf=$state/slurm.conf
case "${1:-start}" in
  start)
    if command -v sinfo >/dev/null && sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then
      exit 0  # this machine's own Slurm is up: use it as configured
    fi
    if [ -f "$conf" ] && SLURM_CONF=$conf sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then
      echo "export SLURM_CONF=$conf"  # ours, from an earlier run on a reused machine
      exit 0
    fi
    if ! command -v slurmctld >/dev/null; then
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
    fi
    mkdir -p "$state/ctld" "$state/d" "$state/log" /run/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then  # only a key this script creates gets its owner and mode set
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
      chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
      chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
    fi
    host=$(hostname)
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat > "$conf" <<CONF
ClusterName=ember
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=4
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
NodeName=$host CPUs=$(nproc) RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=$conf
    # a daemon left from an earlier run on a reused machine is kept, not started twice
    pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$state/munged.pid"
    pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld -f "$conf"
    pgrep -x slurmd >/dev/null || /usr/sbin/slurmd -f "$conf"
    for _ in $(seq 1 30); do
      if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed"; then echo "export SLURM_CONF=$conf"; exit 0; fi
      sleep 1
    done
    echo "slurm did not come up" >&2; sinfo >&2 || true; exit 1
    ;;
  stop)
    for daemon in slurmd slurmctld munged; do
      if [ -f "$state/$daemon.pid" ]; then kill "$(cat "$state/$daemon.pid")" 2>/dev/null || true; fi
    done
    ;;
esac
