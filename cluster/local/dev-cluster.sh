#!/usr/bin/env bash
# A laptop multi-node dev cluster: a head and one worker node on this machine, token auth on.
#   bash cluster/local/dev-cluster.sh up [CPUS_PER_NODE]   then   ember submit SPEC
#   bash cluster/local/dev-cluster.sh down
set -euo pipefail
cpus=${2:-2}
case "${1:-up}" in
  up)
    ember up --name dev-head --port 8265 --gcs-port 6379 --num-cpus "$cpus"
    ember up --name dev-node2 --join 127.0.0.1:6379 --num-cpus "$cpus"
    echo "submit with: ember submit SPEC --address http://127.0.0.1:8265"
    ;;
  down)
    ember down --name dev-node2 || true
    ember down --name dev-head
    ;;
  *) echo "usage: $0 up [CPUS_PER_NODE] | down" >&2; exit 2 ;;
esac
