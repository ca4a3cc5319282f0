#!/usr/bin/env bash
# Submit a job spec to a running Ray cluster and follow its logs.
#   launchers/ray-submit.sh SPEC [http://HEAD:8265] [--set a.b=v ...]
# Needs the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token.
set -euo pipefail
spec=${1:?usage: $0 SPEC [ADDRESS] [--set ...]}
shift
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then address=$1; shift; fi
job=$(ember submit "$spec" --address "$address" "$@" | awk '/^submitted/ {print $2}')
echo "job $job on $address"
ember logs "$job" --address "$address" --follow
state=$(ember status "$job" --address "$address")
echo "$job: $state"
[ "$state" = SUCCEEDED ]
