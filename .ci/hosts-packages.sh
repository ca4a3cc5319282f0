#!/usr/bin/env bash
# Debian's packages for the hosts tier, installed once: Slurm and munge for the two-host Slurm test
# (tests/hosts/test_slurm_two_hosts.py), OpenSSH and rsync for `ray up` over SSH (tests/hosts/test_ray_up.py), and
# iproute2 (`ip netns`, veth links) for the namespaced hosts themselves.
#   bash .ci/hosts-packages.sh
# Only the programs: the tests write their configuration to folders of their own (SLURM_CONF, an sshd_config per
# host), start munged, slurmctld, slurmd and sshd themselves inside the namespaced hosts, and stop each by the PID
# they started. Package scripts start no daemon here (no systemd); the tests leave /etc/slurm, /etc/munge and
# /etc/ssh as the packages installed them.
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge openssh-server openssh-client rsync iproute2)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
