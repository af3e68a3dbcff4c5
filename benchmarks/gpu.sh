#!/usr/bin/env bash
# Runs the benchmarks on a GPU machine, each under `timeout`, within 8 minutes in all, and
# prints their outputs. Exits quietly (0) when there is no GPU (no nvidia-smi).
# Run from the repository root:  bash benchmarks/gpu.sh [python]
set -u
PY="${1:-${PYTHON:-python}}"
cd "$(dirname "$0")/.." || exit 1

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu.sh: nvidia-smi not found, no GPU here; nothing run"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# name|seconds|command  (budgets add up to 450 s, leaving room for start-up)
CHECKS=(
    "projection|120|$PY benchmarks/projection.py --repeats 3"
    "overhead|120|$PY benchmarks/overhead.py --epochs 5 --repeats 2"
    "inference|120|$PY benchmarks/inference.py --batch-sizes 1 16 --repeats 10"
    "distributed_projection|90|$PY benchmarks/distributed_projection.py --repeats 3"
)
status=0
for check in "${CHECKS[@]}"; do
    IFS='|' read -r name seconds cmd <<<"$check"
    echo "=== $name (timeout ${seconds}s): $cmd"
    start=$SECONDS
    timeout --kill-after=10 "$seconds" $cmd 2>&1
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
done
exit "$status"
