#!/usr/bin/env bash
# The accelerator check: one prepared run, within 8 minutes on one GPU, of the
# FedAvg throughput benchmark (experiments/benchmarks/fedavg_throughput.py) at
# 50, 500 and 5,000 clients per round, for the FedAvg-paper MLP and CNN and
# for FedIT (LoRA) on a GPT-2-shaped transformer, each against the centralized
# step on the same work (and the Python loop over clients at 50), with the
# round's XLA memory and the device's peak memory. Every ratio is measured in
# one process.
#
#   bash experiments/benchmarks/accelerator_check.sh            # on the GPU
#   bash experiments/benchmarks/accelerator_check.sh --shrink   # CPU, seconds
#
# --shrink runs one tiny cohort per model (tests/test_benchmarks.py runs it
# with ACCEL_MODELS="mlp lora", so the script cannot rot; the CNN's compile
# alone takes 20 s on a CPU). ACCEL_MODELS picks the models (default all
# three). Output: one block per run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
shrink=0
[[ "${1:-}" == "--shrink" ]] && shrink=1

run() {  # model clients population rounds warmup methods [extra flags]
  local model=$1 clients=$2 population=$3 rounds=$4 warmup=$5 methods=$6
  shift 6
  echo "=== model=$model clients=$clients population=$population"
  "$PY" -m experiments.benchmarks.fedavg_throughput --model="$model" \
    --clients="$clients" --population="$population" --rounds="$rounds" \
    --warmup="$warmup" --methods="$methods" \
    --lanes=$(( clients > 40 ? clients / 10 : 2 )) "$@" 2>&1 |
    grep -E '^(jax|[0-9]+ examples|simulator|python_loop|centralized|process|device|method)'
}

models=${ACCEL_MODELS:-mlp cnn lora}
if (( shrink )); then
  for model in $models; do
    run "$model" 4 40 1 1 simulator,centralized \
      --dim=16 --layers=1 --heads=2 --seq_len=8
  done
  exit 0
fi

for model in $models; do
  run "$model" 50 1000 10 3 simulator,simulator_dp,python_loop,centralized
  run "$model" 500 1000 5 2 simulator,centralized
  run "$model" 5000 10000 2 1 simulator,centralized
done
