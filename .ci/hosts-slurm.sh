#!/usr/bin/env bash
# Debian's Slurm and munge for the two-host Slurm test (tests/hosts/test_slurm_two_hosts.py), installed once.
#   bash .ci/hosts-slurm.sh
# Only the programs: the test writes its configuration to a folder of its own (SLURM_CONF), starts munged,
# slurmctld and slurmd itself inside the namespaced hosts, and stops each by the PID it started. Package
# scripts start no daemon here (no systemd), and /etc/slurm and /etc/munge are not touched.
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
