#!/usr/bin/env bash
# GPU path check (nccl, bf16/fp16, CUDA): the quickstart and each engine through the torchrun entry point.
#   bash bench/gpu_check.sh [steps]
# Run on a machine with one GPU; prints one JSON line per job from its events.jsonl, then a summary.
set -euo pipefail
steps=${1:-400}
out=${OUT:-/tmp/ember-gpu}
mkdir -p "$out"
python3 -m ember.cli data build text --out data/stdlib-text >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run() {  # name, then --set overrides
  local name=$1; shift
  local sets=()
  for item in "$@"; do sets+=(--set "$item"); done
  local started=$(date +%s.%N)
  python3 -m torch.distributed.run --nproc-per-node 1 --master-port 29577 -m ember.train.torchrun jobs/quickstart.yaml \
    --set run_dir=/tmp/ember-gpu-runs/$name --set cluster.device=cuda --set cluster.num_workers=1 \
    --set checkpoint.resume=never --set logging.sample_tokens=100 "${sets[@]}" > "$out/$name.log" 2>&1
  local ended=$(date +%s.%N)
  python3 - "$name" "$started" "$ended" /tmp/ember-gpu-runs/$name/events.jsonl <<'PY'
import json, sys, statistics
name, started, ended, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
events = [json.loads(line) for line in open(path)]
steps = [e["time"] for e in events if e["kind"] == "step"]
logs = [e for e in events if e["kind"] == "log"]
evals = [e for e in events if e["kind"] == "eval"]
diffs = [b - a for a, b in zip(steps, steps[1:])][10:]
print(json.dumps({"job": name, "wall_s": round(ended - started, 1), "step_ms": round(1000 * statistics.median(diffs), 2),
                  "tokens_per_s": round(logs[-1]["tokens_per_s"]), "final_loss": round(logs[-1]["loss"], 4),
                  "val_loss": round(evals[-1]["val_loss"], 4) if evals else None}))
PY
}
run quickstart-moe-zero2-bf16 "schedule.steps=$steps" engine.precision=bf16 model.moe.ep_size=1
run quickstart-moe-zero2-fp32 "schedule.steps=$steps" model.moe.ep_size=1
run dense-zero3-bf16 "schedule.steps=$steps" engine.precision=bf16 model.moe=null engine.zero_stage=3
run dense-zero2-fp16 "schedule.steps=$steps" engine.precision=fp16 model.moe=null
run dense-ddp-bf16 "schedule.steps=$steps" 'engine={kind: ddp, precision: bf16}' model.moe=null
run dense-fsdp2-bf16 "schedule.steps=$steps" 'engine={kind: fsdp, precision: bf16}' model.moe=null
run dense-fairscale-fsdp-bf16 "schedule.steps=$steps" 'engine={kind: fairscale, mode: fsdp, precision: bf16}' model.moe=null
grep -h "sample after" -A3 "$out/quickstart-moe-zero2-bf16.log" || true
# MoE layer on the GPU: ember's default there (torch's grouped GEMM, bf16) vs DeepSpeed's MoE and a dense FFN,
# then ember's backends side by side (grouped_mm vs the segment loop vs padded).
python3 bench/moe_layer.py --device cuda --dtype bf16 --tokens 16384 --repeats 10 | tee "$out/moe_layer.log"
python3 bench/moe_layer.py --device cuda --dtype bf16 --tokens 16384 --repeats 10 --backends | tee "$out/moe_backends.log"
